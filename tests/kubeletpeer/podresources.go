package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	podresourcesv1alpha1 "k8s.io/kubelet/pkg/apis/podresources/v1alpha1"
	apisgrpc "k8s.io/kubernetes/pkg/kubelet/apis/grpc"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
)

// devices adapts the device manager to the PodResources DevicesProvider, as the kubelet's container
// manager does (one ContainerDevices per device and NUMA node).
type devices struct{ m *devicemanager.ManagerImpl }

func (d devices) UpdateAllocatedDevices(logger klog.Logger) { d.m.UpdateAllocatedDevices(logger) }
func (d devices) GetDevices(podUID, container string) []*podresourcesv1.ContainerDevices {
	return toContainerDevices(d.m.GetDevices(podUID, container))
}
func (d devices) GetAllocatableDevices(logger klog.Logger) []*podresourcesv1.ContainerDevices {
	return toContainerDevices(d.m.GetAllocatableDevices(logger))
}

func toContainerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesv1.ContainerDevices {
	var out []*podresourcesv1.ContainerDevices
	for res, instances := range devs {
		for id, dev := range instances {
			topo := dev.GetTopology()
			if topo == nil {
				out = append(out, &podresourcesv1.ContainerDevices{ResourceName: res, DeviceIds: []string{id}})
				continue
			}
			for _, node := range topo.GetNodes() {
				out = append(out, &podresourcesv1.ContainerDevices{
					ResourceName: res,
					DeviceIds:    []string{id},
					Topology:     &podresourcesv1.TopologyInfo{Nodes: []*podresourcesv1.NUMANode{{ID: node.GetID()}}},
				})
			}
		}
	}
	return out
}

// The peer manages no CPUs, memory or DRA claims: those providers answer with nothing.
type nothing struct{}

func (nothing) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (nothing) GetPodCPUs(string) []int64              { return nil }
func (nothing) GetAllocatableCPUs() []int64            { return nil }
func (nothing) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.ContainerMemory {
	return nil
}
func (nothing) GetPodMemory(klog.Logger, string) []*podresourcesv1.ContainerMemory { return nil }
func (nothing) GetAllocatableMemory(klog.Logger) []*podresourcesv1.ContainerMemory { return nil }
func (nothing) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.DynamicResource {
	return nil
}

// servePodResources serves PodResources v1 (and v1alpha1) as the kubelet's ListenAndServePodResources does,
// with its rate limiter; returns a function that stops the server.
func servePodResources(logger klog.Logger, path string, pods *podStore, m *devicemanager.ManagerImpl) (func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing the old PodResources socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("PodResources socket: %w", err)
	}
	ctx := klog.NewContext(context.Background(), logger)
	providers := podresources.PodResourcesProviders{
		Pods: pods, Devices: devices{m}, Cpus: nothing{}, Memory: nothing{}, DynamicResources: nothing{},
	}
	srv := grpc.NewServer(apisgrpc.WithRateLimiter(ctx, "podresources", podresources.DefaultQPS, podresources.DefaultBurstTokens))
	podresourcesv1alpha1.RegisterPodResourcesListerServer(srv, podresources.NewV1alpha1PodResourcesServer(providers))
	podresourcesv1.RegisterPodResourcesListerServer(srv, podresources.NewV1PodResourcesServer(ctx, providers))
	go func() {
		if err := srv.Serve(ln); err != nil {
			logger.Error(err, "PodResources server stopped")
		}
	}()
	return srv.Stop, nil
}
