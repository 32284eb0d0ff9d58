// Command kubeletpeer runs the kubelet's own device manager (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager)
// and PodResources v1 server (pkg/kubelet/apis/podresources) as a test peer for cpupool's agent.
//
// It is driven like a tool: one JSON command per line on stdin, one JSON reply per line on stdout (with the
// command's "id"), and asynchronous {"event": ...} lines on stdout in between. See tests/kubeletpeer.py.
//
// The device manager listens on the fixed path /var/lib/kubelet/device-plugins/kubelet.sock (NewManagerImpl
// takes no path). So that a test can use its own directory, the program re-executes itself in a private mount
// namespace (it must run as root), mounts a tmpfs over /var/lib there and bind-mounts the test's plugin
// directory onto /var/lib/kubelet/device-plugins. Sockets are reached by inode, so the agent outside the
// namespace sees kubelet.sock in its directory and the kubelet dials the agent's sockets through the bind mount.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager/bitmask"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"

	cadvisorapi "github.com/google/cadvisor/lib/model"
)

type options struct {
	pluginDir    string
	podResources string
	stateFile    string
	numaNodes    []int
}

func parseFlags() (options, error) {
	var o options
	var numa string
	flag.StringVar(&o.pluginDir, "plugin-dir", "", "directory served as /var/lib/kubelet/device-plugins")
	flag.StringVar(&o.podResources, "pod-resources", "", "unix socket path for the PodResources v1 API")
	flag.StringVar(&o.stateFile, "state", "", "JSON file with the peer's pod list and node status (kept across restarts)")
	flag.StringVar(&numa, "numa-nodes", "0", "comma-separated NUMA node IDs of the emulated machine")
	flag.Parse()
	if o.pluginDir == "" || o.podResources == "" || o.stateFile == "" {
		return o, errors.New("--plugin-dir, --pod-resources and --state are required")
	}
	for _, p := range []*string{&o.pluginDir, &o.podResources, &o.stateFile} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return o, err
		}
		*p = abs
	}
	for _, part := range strings.Split(numa, ",") {
		if part = strings.TrimSpace(part); part == "" {
			continue
		}
		n, err := strconv.Atoi(part)
		if err != nil {
			return o, fmt.Errorf("--numa-nodes: %q is not a node ID", part)
		}
		o.numaNodes = append(o.numaNodes, n)
	}
	return o, nil
}

func main() {
	opts, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeletpeer:", err)
		os.Exit(2)
	}
	if os.Getenv(inNamespaceEnv) == "" {
		os.Exit(reexecInNamespace())
	}
	if err := enterPluginDir(opts); err != nil {
		fmt.Fprintln(os.Stderr, "kubeletpeer:", err)
		os.Exit(3)
	}
	out := newOutput(os.Stdout)
	p, err := newPeer(opts, out)
	if err != nil {
		out.event("fatal", map[string]any{"error": err.Error()})
		os.Exit(1)
	}
	os.Exit(p.serve(os.Stdin))
}

// -- pods: the peer's own pod list, standing in for what the kubelet learns from the API server --

type containerSpec struct {
	Name      string           `json:"name"`
	Resources map[string]int64 `json:"resources"`
}

type podSpec struct {
	UID        string          `json:"uid"`
	Namespace  string          `json:"namespace"`
	Name       string          `json:"name"`
	Containers []containerSpec `json:"containers"`
}

func (s *podSpec) pod() *v1.Pod {
	pod := &v1.Pod{}
	pod.UID = types.UID(s.UID)
	pod.Namespace, pod.Name = s.Namespace, s.Name
	for _, c := range s.Containers {
		pod.Spec.Containers = append(pod.Spec.Containers, containerOf(c))
	}
	return pod
}

func containerOf(c containerSpec) v1.Container {
	limits := v1.ResourceList{}
	for name, n := range c.Resources {
		limits[v1.ResourceName(name)] = *resource.NewQuantity(n, resource.DecimalSI)
	}
	// Extended resources must have requests equal to limits; the device manager reads the limits.
	return v1.Container{Name: c.Name, Resources: v1.ResourceRequirements{Limits: limits, Requests: limits.DeepCopy()}}
}

type stateFile struct {
	Pods        []*podSpec       `json:"pods"`
	Capacity    map[string]int64 `json:"node_capacity"`
	Allocatable map[string]int64 `json:"node_allocatable"`
}

// podStore is the PodsProvider of the PodResources server and the device manager's activePods.
type podStore struct {
	mu    sync.Mutex
	path  string
	state stateFile
}

func loadPodStore(path string) (*podStore, error) {
	s := &podStore{path: path}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		if err := json.Unmarshal(data, &s.state); err != nil {
			return nil, fmt.Errorf("state file %s: %w", path, err)
		}
	}
	if s.state.Capacity == nil {
		s.state.Capacity = map[string]int64{}
	}
	if s.state.Allocatable == nil {
		s.state.Allocatable = map[string]int64{}
	}
	return s, nil
}

// save writes the state atomically; the caller holds mu.
func (s *podStore) save() error {
	data, err := json.MarshalIndent(&s.state, "", " ")
	if err != nil {
		return err
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, s.path)
}

func (s *podStore) find(uid string) *podSpec {
	for _, p := range s.state.Pods {
		if p.UID == uid {
			return p
		}
	}
	return nil
}

func (s *podStore) pods() []*v1.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*v1.Pod, 0, len(s.state.Pods))
	for _, p := range s.state.Pods {
		out = append(out, p.pod())
	}
	return out
}

func (s *podStore) GetActivePods() []*v1.Pod { return s.pods() }
func (s *podStore) GetPods() []*v1.Pod       { return s.pods() }
func (s *podStore) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.state.Pods {
		if p.Namespace == namespace && p.Name == name {
			return p.pod(), true
		}
	}
	return nil, false
}

// -- topology: what the topology manager decided for each container (none unless a command says so) --

type affinityStore struct {
	mu    sync.Mutex
	hints map[string]topologymanager.TopologyHint // podUID/container
}

func (a *affinityStore) GetAffinity(_ klog.Logger, podUID, container string) topologymanager.TopologyHint {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hints[podUID+"/"+container]
}
func (a *affinityStore) GetPolicy() topologymanager.Policy { return topologymanager.NewNonePolicy() }
func (a *affinityStore) Name() string                      { return "kubeletpeer" }

func (a *affinityStore) set(podUID, container string, numa []int) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	key := podUID + "/" + container
	if numa == nil {
		delete(a.hints, key)
		return nil
	}
	mask, err := bitmask.NewBitMask(numa...)
	if err != nil {
		return err
	}
	a.hints[key] = topologymanager.TopologyHint{NUMANodeAffinity: mask, Preferred: true}
	return nil
}

// sourcesReady: the peer's pod list is always complete, so stale allocations may be garbage-collected.
type sourcesReady struct{}

func (sourcesReady) AddSource(string) {}
func (sourcesReady) AllReady() bool   { return true }

// -- the peer --

type peer struct {
	opts     options
	out      *output
	logger   klog.Logger
	manager  *devicemanager.ManagerImpl
	pods     *podStore
	affinity *affinityStore
	stopPR   func()
	states   *stateEmitter
}

func newPeer(opts options, out *output) (*peer, error) {
	logger := installLogger(out)
	pods, err := loadPodStore(opts.stateFile)
	if err != nil {
		return nil, err
	}
	var topology []cadvisorapi.Node
	for _, n := range opts.numaNodes {
		topology = append(topology, cadvisorapi.Node{Id: n})
	}
	affinity := &affinityStore{hints: map[string]topologymanager.TopologyHint{}}
	manager, err := devicemanager.NewManagerImpl(logger, topology, affinity)
	if err != nil {
		return nil, err
	}
	p := &peer{opts: opts, out: out, logger: logger, manager: manager, pods: pods, affinity: affinity}
	// As the kubelet does at start: without a device manager checkpoint the node was recreated, and extended
	// resources in node status start from zero.
	if manager.ShouldResetExtendedResourceCapacity() {
		pods.mu.Lock()
		for name := range pods.state.Capacity {
			pods.state.Capacity[name] = 0
			pods.state.Allocatable[name] = 0
		}
		pods.mu.Unlock()
	}
	// Containers of known pods are reported running, as the runtime would after a kubelet restart.
	containers := containermap.NewContainerMap()
	running := sets.New[string]()
	for _, pod := range pods.pods() {
		for _, c := range pod.Spec.Containers {
			id := string(pod.UID) + "/" + c.Name
			containers.Add(string(pod.UID), c.Name, id)
			running.Insert(id)
		}
	}
	if err := manager.Start(logger, pods.GetActivePods, sourcesReady{}, containers, running); err != nil {
		return nil, fmt.Errorf("device manager start: %w", err)
	}
	stop, err := servePodResources(logger, opts.podResources, pods, manager)
	if err != nil {
		_ = manager.Stop(logger)
		return nil, err
	}
	p.stopPR = stop
	p.states = newStateEmitter(p)
	setLogHook(p.states.poke)
	go p.nodeStatusLoop()
	out.event("ready", map[string]any{
		"socket":        filepath.Join(opts.pluginDir, "kubelet.sock"),
		"pod_resources": opts.podResources,
		"pid":           os.Getpid(),
	})
	p.states.poke()
	return p, nil
}

// nodeStatusLoop updates node status every 10 s, as the kubelet's default nodeStatusUpdateFrequency does.
func (p *peer) nodeStatusLoop() {
	for range time.Tick(10 * time.Second) {
		p.nodeStatus()
	}
}

type request struct {
	ID           int64            `json:"id"`
	Op           string           `json:"op"`
	Pod          string           `json:"pod"`
	UID          string           `json:"uid"`
	Container    string           `json:"container"`
	Resources    map[string]int64 `json:"resources"`
	NUMAAffinity []int            `json:"numa_affinity"`
	// For "observe": whether state snapshots are sent after changes.
	On bool `json:"on"`
}

func (p *peer) serve(stdin *os.File) int {
	scanner := bufio.NewScanner(stdin)
	scanner.Buffer(make([]byte, 1<<20), 64<<20)
	for scanner.Scan() {
		line := strings.TrimSpace(scanner.Text())
		if line == "" {
			continue
		}
		var req request
		if err := json.Unmarshal([]byte(line), &req); err != nil {
			p.out.reply(req.ID, nil, fmt.Errorf("bad command %q: %w", line, err))
			continue
		}
		if req.Op == "quit" {
			p.shutdown()
			p.out.reply(req.ID, map[string]any{}, nil)
			return 0
		}
		result, err := p.handle(&req)
		p.out.reply(req.ID, result, err)
		p.states.poke()
	}
	// stdin closed: the driver went away.
	p.shutdown()
	return 0
}

func (p *peer) shutdown() {
	if err := p.manager.Stop(p.logger); err != nil {
		p.logger.Error(err, "device manager stop")
	}
	p.stopPR()
}

func (p *peer) handle(req *request) (map[string]any, error) {
	switch req.Op {
	case "allocate":
		return p.allocate(req)
	case "remove_pod":
		return p.removePod(req)
	case "node_status":
		return p.nodeStatus(), nil
	case "topology_hints":
		return p.topologyHints(req)
	case "devices", "state":
		return p.snapshot()
	case "pods":
		return map[string]any{"pods": p.podsWithDevices()}, nil
	case "ping":
		return map[string]any{}, nil
	case "observe":
		p.states.observe(req.On)
		return map[string]any{}, nil
	}
	return nil, fmt.Errorf("unknown op %q", req.Op)
}

func splitPod(ref string) (string, string, error) {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok || ns == "" || name == "" {
		return "", "", fmt.Errorf("pod %q is not namespace/name", ref)
	}
	return ns, name, nil
}

// allocate admits one container as the kubelet does: the pod is active (the pod manager knows it before
// admission), Allocate runs GetPreferredAllocation and Allocate on the plugins, then the container's run
// options come from GetDeviceRunContainerOptions (PreStartContainer when the plugin asks for it).
func (p *peer) allocate(req *request) (map[string]any, error) {
	ns, name, err := splitPod(req.Pod)
	if err != nil {
		return nil, err
	}
	if req.UID == "" || req.Container == "" || len(req.Resources) == 0 {
		return nil, errors.New("allocate needs uid, container and resources")
	}
	p.pods.mu.Lock()
	spec := p.pods.find(req.UID)
	created := spec == nil
	if created {
		spec = &podSpec{UID: req.UID, Namespace: ns, Name: name}
		p.pods.state.Pods = append(p.pods.state.Pods, spec)
	}
	for _, c := range spec.Containers {
		if c.Name == req.Container {
			p.pods.mu.Unlock()
			return nil, fmt.Errorf("pod %s already has a container %q", req.Pod, req.Container)
		}
	}
	spec.Containers = append(spec.Containers, containerSpec{Name: req.Container, Resources: req.Resources})
	pod := spec.pod()
	p.pods.mu.Unlock()
	container := &pod.Spec.Containers[len(pod.Spec.Containers)-1]

	if err := p.affinity.set(req.UID, req.Container, req.NUMAAffinity); err != nil {
		p.forgetContainer(req.UID, req.Container, created)
		return nil, err
	}
	ctx := klog.NewContext(context.Background(), p.logger)
	// The admission's own time, for benchmarks: the driver's round trip also holds JSON lines and the
	// state events of other commands, which the kubelet never pays.
	admitStart := time.Now()
	err = p.manager.Allocate(ctx, pod, container, lifecycle.AddOperation)
	admitSeconds := time.Since(admitStart).Seconds()
	if err != nil {
		// Admission failed: the kubelet rejects the pod, which then is no longer active.
		p.forgetContainer(req.UID, req.Container, created)
		return nil, err
	}
	// A resource the device manager does not know is ignored by Allocate; in a cluster such a pod would have
	// failed the node's resource fit before reaching it. Reject it the same way.
	got := deviceIDs(p.manager.GetDevices(req.UID, req.Container))
	for res, n := range req.Resources {
		if int64(len(got[res])) != n {
			p.forgetContainer(req.UID, req.Container, created)
			return nil, fmt.Errorf("%s is not a device plugin resource of this node (got %d of %d devices)", res, len(got[res]), n)
		}
	}
	runOpts, err := p.manager.GetDeviceRunContainerOptions(ctx, pod, container)
	if err != nil {
		p.saveState()
		return nil, fmt.Errorf("container start: %w", err)
	}
	p.saveState()
	result := runOptions(runOpts)
	result["device_ids"] = got
	// device manager Allocate: GetPreferredAllocation, Allocate and the checkpoint write, in seconds.
	result["allocate_s"] = admitSeconds
	return result, nil
}

func (p *peer) forgetContainer(uid, container string, wholePod bool) {
	p.pods.mu.Lock()
	defer p.pods.mu.Unlock()
	for i, spec := range p.pods.state.Pods {
		if spec.UID != uid {
			continue
		}
		if wholePod {
			p.pods.state.Pods = append(p.pods.state.Pods[:i], p.pods.state.Pods[i+1:]...)
			break
		}
		kept := spec.Containers[:0]
		for _, c := range spec.Containers {
			if c.Name != container {
				kept = append(kept, c)
			}
		}
		spec.Containers = kept
		break
	}
	if err := p.pods.save(); err != nil {
		p.logger.Error(err, "saving the pod list")
	}
}

func (p *peer) saveState() {
	p.pods.mu.Lock()
	defer p.pods.mu.Unlock()
	if err := p.pods.save(); err != nil {
		p.logger.Error(err, "saving the pod list")
	}
}

func runOptions(o *devicemanager.DeviceRunContainerOptions) map[string]any {
	envs := map[string]string{}
	annotations := map[string]string{}
	devices := []map[string]any{}
	mounts := []map[string]any{}
	cdi := []string{}
	if o != nil {
		for _, e := range o.Envs {
			envs[e.Name] = e.Value
		}
		for _, a := range o.Annotations {
			annotations[a.Name] = a.Value
		}
		for _, d := range o.Devices {
			devices = append(devices, map[string]any{
				"container_path": d.PathInContainer, "host_path": d.PathOnHost, "permissions": d.Permissions,
			})
		}
		for _, m := range o.Mounts {
			mounts = append(mounts, map[string]any{
				"container_path": m.ContainerPath, "host_path": m.HostPath, "read_only": m.ReadOnly,
			})
		}
		for _, c := range o.CDIDevices {
			cdi = append(cdi, c.Name)
		}
	}
	return map[string]any{"envs": envs, "annotations": annotations, "devices": devices, "mounts": mounts, "cdi_devices": cdi}
}

func deviceIDs(devs devicemanager.ResourceDeviceInstances) map[string][]string {
	out := map[string][]string{}
	for res, instances := range devs {
		ids := make([]string, 0, len(instances))
		for id := range instances {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		out[res] = ids
	}
	return out
}

// removePod: the pod is gone from the API; the device manager frees its devices on its next
// UpdateAllocatedDevices, which the kubelet runs at admission, in PodResources List and for topology hints.
func (p *peer) removePod(req *request) (map[string]any, error) {
	p.pods.mu.Lock()
	var gone *podSpec
	for i, spec := range p.pods.state.Pods {
		if spec.UID == req.UID || (req.UID == "" && spec.Namespace+"/"+spec.Name == req.Pod) {
			gone = spec
			p.pods.state.Pods = append(p.pods.state.Pods[:i], p.pods.state.Pods[i+1:]...)
			break
		}
	}
	if err := p.pods.save(); err != nil {
		p.logger.Error(err, "saving the pod list")
	}
	p.pods.mu.Unlock()
	if gone == nil {
		return nil, fmt.Errorf("no active pod %q (uid %q)", req.Pod, req.UID)
	}
	freed := map[string][]string{}
	for _, c := range gone.Containers {
		for res, ids := range deviceIDs(p.manager.GetDevices(gone.UID, c.Name)) {
			freed[res] = append(freed[res], ids...)
		}
	}
	p.manager.UpdateAllocatedDevices(p.logger)
	return map[string]any{"freed": freed, "uid": gone.UID}, nil
}

// nodeStatus applies GetCapacity to the node status kept in the state file, with the kubelet's setter rules:
// capacity from the device manager, removed resources set to 0 (they stay in node status), allocatable equal
// to capacity and then overridden by the device manager's allocatable.
func (p *peer) nodeStatus() map[string]any {
	capacity, allocatable, removed := p.manager.GetCapacity(p.logger)
	p.pods.mu.Lock()
	defer p.pods.mu.Unlock()
	st := &p.pods.state
	for name, q := range capacity {
		st.Capacity[string(name)] = q.Value()
	}
	for _, name := range removed {
		st.Capacity[name] = 0
	}
	for name := range st.Allocatable {
		if _, ok := st.Capacity[name]; !ok {
			delete(st.Allocatable, name)
		}
	}
	for name, v := range st.Capacity {
		st.Allocatable[name] = v
	}
	for name, q := range allocatable {
		st.Allocatable[string(name)] = q.Value()
	}
	if err := p.pods.save(); err != nil {
		p.logger.Error(err, "saving node status")
	}
	raw := func(l v1.ResourceList) map[string]int64 {
		m := map[string]int64{}
		for k, q := range l {
			m[string(k)] = q.Value()
		}
		return m
	}
	sort.Strings(removed)
	return map[string]any{
		"capacity":           copyCounts(st.Capacity),
		"allocatable":        copyCounts(st.Allocatable),
		"device_capacity":    raw(capacity),
		"device_allocatable": raw(allocatable),
		"removed":            removed,
	}
}

func copyCounts(m map[string]int64) map[string]int64 {
	out := make(map[string]int64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (p *peer) topologyHints(req *request) (map[string]any, error) {
	ns, name, err := splitPod(req.Pod)
	if err != nil {
		return nil, err
	}
	spec := &podSpec{UID: req.UID, Namespace: ns, Name: name,
		Containers: []containerSpec{{Name: req.Container, Resources: req.Resources}}}
	pod := spec.pod()
	hints := p.manager.GetTopologyHints(p.logger, pod, &pod.Spec.Containers[0], lifecycle.AddOperation)
	out := map[string]any{}
	for res, list := range hints {
		entries := []map[string]any{}
		for _, h := range list {
			var nodes []int
			if h.NUMANodeAffinity != nil {
				nodes = h.NUMANodeAffinity.GetBits()
			}
			entries = append(entries, map[string]any{"numa_nodes": nodes, "preferred": h.Preferred})
		}
		out[res] = entries
	}
	return map[string]any{"hints": out}, nil
}

func (p *peer) podsWithDevices() []map[string]any {
	out := []map[string]any{}
	for _, pod := range p.pods.pods() {
		containers := map[string]any{}
		for _, c := range pod.Spec.Containers {
			containers[c.Name] = deviceIDs(p.manager.GetDevices(string(pod.UID), c.Name))
		}
		out = append(out, map[string]any{
			"uid": string(pod.UID), "namespace": pod.Namespace, "name": pod.Name, "containers": containers,
		})
	}
	return out
}
