// nripeer runs the runtime side of NRI (github.com/containerd/nri pkg/adaptation, the code containerd and
// CRI-O embed) with a fake runtime behind it, for the Python tests. It reads one JSON command per line on
// stdin and answers each with one JSON line on stdout ({"id": ..., "ok": true, ...} or "error"); things the
// plugin does on its own (synchronization, unsolicited updates, plugin count changes) come as event lines
// ({"event": ...}). Nothing is printed anywhere else on stdout; NRI's own log goes to stderr.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	nri "github.com/containerd/nri/pkg/adaptation"
	"github.com/sirupsen/logrus"
)

type command struct {
	ID        int               `json:"id"`
	Op        string            `json:"op"`
	Socket    string            `json:"socket,omitempty"`
	Pod       string            `json:"pod,omitempty"`
	Name      string            `json:"name,omitempty"`
	Namespace string            `json:"namespace,omitempty"`
	UID       string            `json:"uid,omitempty"`
	Container string            `json:"container,omitempty"`
	Env       []string          `json:"env,omitempty"`
	Annots    map[string]string `json:"annotations,omitempty"`
	Cpus      string            `json:"cpus,omitempty"`
	Mems      string            `json:"mems,omitempty"`
	Count     int               `json:"count,omitempty"`
	TimeoutMs int               `json:"timeout_ms,omitempty"`
}

type cpuState struct {
	ID   string `json:"id"`
	Cpus string `json:"cpus"`
	Mems string `json:"mems"`
}

type peer struct {
	out     *json.Encoder
	outLock sync.Mutex

	lock       sync.Mutex
	pods       map[string]*nri.PodSandbox
	containers map[string]*nri.Container
	order      []string
	plugins    int
	pluginC    chan struct{}
	runtime    *nri.Adaptation
	pluginDir  string
	front      *frontDoor
}

func (p *peer) emit(v map[string]any) {
	p.outLock.Lock()
	defer p.outLock.Unlock()
	if err := p.out.Encode(v); err != nil {
		fmt.Fprintf(os.Stderr, "nripeer: cannot write: %v\n", err)
		os.Exit(3)
	}
}

// metrics: only the plugin count matters here, to know when a plugin is registered and synchronized.
type metrics struct{ p *peer }

func (m metrics) RecordPluginInvocation(string, string, error)                               {}
func (m metrics) RecordPluginLatency(string, string, time.Duration)                          {}
func (m metrics) RecordPluginAdjustments(string, string, *nri.ContainerAdjustment, int, int) {}
func (m metrics) UpdatePluginCount(count int) {
	m.p.lock.Lock()
	m.p.plugins = count
	close(m.p.pluginC)
	m.p.pluginC = make(chan struct{})
	m.p.lock.Unlock()
	m.p.emit(map[string]any{"event": "plugins", "count": count})
}

func cpuOf(c *nri.Container) (string, string) {
	if c.Linux == nil || c.Linux.Resources == nil || c.Linux.Resources.Cpu == nil {
		return "", ""
	}
	return c.Linux.Resources.Cpu.Cpus, c.Linux.Resources.Cpu.Mems
}

func setCPU(c *nri.Container, cpus, mems string) {
	if c.Linux == nil {
		c.Linux = &nri.LinuxContainer{}
	}
	if c.Linux.Resources == nil {
		c.Linux.Resources = &nri.LinuxResources{}
	}
	if c.Linux.Resources.Cpu == nil {
		c.Linux.Resources.Cpu = &nri.LinuxCPU{}
	}
	if cpus != "" {
		c.Linux.Resources.Cpu.Cpus = cpus
	}
	if mems != "" {
		c.Linux.Resources.Cpu.Mems = mems
	}
}

// applyUpdates plays the runtime: the updated resources become the container's. Caller holds p.lock.
func (p *peer) applyUpdates(updates []*nri.ContainerUpdate) []cpuState {
	applied := []cpuState{}
	for _, u := range updates {
		c, ok := p.containers[u.ContainerId]
		if !ok || u.Linux == nil || u.Linux.Resources == nil || u.Linux.Resources.Cpu == nil {
			continue
		}
		setCPU(c, u.Linux.Resources.Cpu.Cpus, u.Linux.Resources.Cpu.Mems)
		cpus, mems := cpuOf(c)
		applied = append(applied, cpuState{u.ContainerId, cpus, mems})
	}
	return applied
}

func (p *peer) synchronize(ctx context.Context, cb nri.SyncCB) error {
	p.lock.Lock()
	pods := make([]*nri.PodSandbox, 0, len(p.pods))
	for _, pod := range p.pods {
		pods = append(pods, pod)
	}
	ctrs := make([]*nri.Container, 0, len(p.containers))
	for _, id := range p.order {
		if c, ok := p.containers[id]; ok {
			ctrs = append(ctrs, c)
		}
	}
	p.lock.Unlock()
	started := time.Now()
	updates, err := cb(ctx, pods, ctrs)
	elapsed := time.Since(started).Microseconds()
	if err != nil {
		p.emit(map[string]any{"event": "sync_failed", "error": err.Error()})
		return err
	}
	p.lock.Lock()
	applied := p.applyUpdates(updates)
	p.lock.Unlock()
	p.emit(map[string]any{
		"event": "synchronized", "containers": len(ctrs), "updates": applied, "elapsed_us": elapsed,
	})
	return nil
}

func (p *peer) update(_ context.Context, updates []*nri.ContainerUpdate) ([]*nri.ContainerUpdate, error) {
	p.lock.Lock()
	applied := p.applyUpdates(updates)
	p.lock.Unlock()
	p.emit(map[string]any{"event": "updates", "updates": applied})
	return nil, nil
}

func (p *peer) start(socket string) error {
	if p.runtime != nil {
		return fmt.Errorf("runtime already started")
	}
	// The adaptation listens on a private socket behind a front door on the public one: stopping the
	// runtime closes every plugin connection and removes the socket, as a runtime that exits does
	// (Adaptation.Stop alone leaves external plugins connected).
	inner := filepath.Join(p.pluginDir, "inner.sock")
	r, err := nri.New("nripeer", "v0.0.0", p.synchronize, p.update,
		nri.WithSocketPath(inner),
		nri.WithPluginPath(p.pluginDir),
		nri.WithPluginConfigPath(p.pluginDir),
		nri.WithMetrics(metrics{p}),
	)
	if err != nil {
		return err
	}
	if err := r.Start(); err != nil {
		return err
	}
	front, err := openFrontDoor(socket, inner)
	if err != nil {
		r.Stop()
		return err
	}
	p.runtime, p.front = r, front
	return nil
}

func (p *peer) handle(ctx context.Context, c *command) (map[string]any, error) {
	reply := map[string]any{}
	switch c.Op {
	case "start":
		return reply, p.start(c.Socket)
	case "stop":
		if p.front != nil {
			p.front.close()
			p.front = nil
		}
		if p.runtime != nil {
			p.runtime.Stop()
			p.runtime = nil
		}
		p.lock.Lock()
		p.plugins = 0
		p.lock.Unlock()
		return reply, nil
	case "wait_plugins":
		deadline := time.After(time.Duration(c.TimeoutMs) * time.Millisecond)
		for {
			p.lock.Lock()
			count, changed := p.plugins, p.pluginC
			p.lock.Unlock()
			if count >= c.Count {
				reply["count"] = count
				return reply, nil
			}
			select {
			case <-changed:
			case <-deadline:
				return reply, fmt.Errorf("%d plugin(s) after %d ms, wanted %d", count, c.TimeoutMs, c.Count)
			}
		}
	case "run_pod":
		pod := &nri.PodSandbox{Id: c.Pod, Name: c.Name, Namespace: c.Namespace, Uid: c.UID, Annotations: c.Annots}
		p.lock.Lock()
		p.pods[c.Pod] = pod
		p.lock.Unlock()
		if p.runtime != nil {
			return reply, p.runtime.RunPodSandbox(ctx, &nri.RunPodSandboxRequest{Pod: pod})
		}
		return reply, nil
	case "create":
		p.lock.Lock()
		pod, ok := p.pods[c.Pod]
		p.lock.Unlock()
		if !ok {
			return reply, fmt.Errorf("unknown pod %q", c.Pod)
		}
		ctr := &nri.Container{
			Id: c.Container, PodSandboxId: c.Pod, Name: c.Name, State: nri.ContainerState_CONTAINER_CREATED,
			Env: c.Env, Annotations: c.Annots,
		}
		setCPU(ctr, c.Cpus, c.Mems)
		adjusted := false
		if p.runtime != nil {
			started := time.Now()
			rpl, err := p.runtime.CreateContainer(ctx, &nri.CreateContainerRequest{Pod: pod, Container: ctr})
			// What the runtime waits for: every plugin's answer, transport included.
			reply["elapsed_us"] = time.Since(started).Microseconds()
			if err != nil {
				return reply, err
			}
			if a := rpl.GetAdjust(); a != nil && a.Linux != nil && a.Linux.Resources != nil && a.Linux.Resources.Cpu != nil {
				cpu := a.Linux.Resources.Cpu
				setCPU(ctr, cpu.Cpus, cpu.Mems)
				adjusted = cpu.Cpus != "" || cpu.Mems != ""
			}
			p.lock.Lock()
			reply["updates"] = p.applyUpdates(rpl.GetUpdate())
			p.lock.Unlock()
		}
		ctr.State = nri.ContainerState_CONTAINER_RUNNING
		p.lock.Lock()
		p.containers[ctr.Id] = ctr
		p.order = append(p.order, ctr.Id)
		p.lock.Unlock()
		cpus, mems := cpuOf(ctr)
		reply["adjusted"], reply["cpus"], reply["mems"] = adjusted, cpus, mems
		return reply, nil
	case "update":
		p.lock.Lock()
		ctr, ok := p.containers[c.Container]
		var pod *nri.PodSandbox
		if ok {
			pod = p.pods[ctr.PodSandboxId]
		}
		p.lock.Unlock()
		if !ok {
			return reply, fmt.Errorf("unknown container %q", c.Container)
		}
		resources := &nri.LinuxResources{Cpu: &nri.LinuxCPU{Cpus: c.Cpus, Mems: c.Mems}}
		updates := []*nri.ContainerUpdate{{ContainerId: ctr.Id, Linux: &nri.LinuxContainerUpdate{Resources: resources}}}
		if p.runtime != nil {
			rpl, err := p.runtime.UpdateContainer(ctx, &nri.UpdateContainerRequest{
				Pod: pod, Container: ctr, LinuxResources: resources,
			})
			if err != nil {
				return reply, err
			}
			updates = rpl.GetUpdate()
		}
		p.lock.Lock()
		reply["updates"] = p.applyUpdates(updates)
		cpus, mems := cpuOf(ctr)
		p.lock.Unlock()
		reply["cpus"], reply["mems"] = cpus, mems
		return reply, nil
	case "stop_container", "remove_container":
		p.lock.Lock()
		ctr, ok := p.containers[c.Container]
		var pod *nri.PodSandbox
		if ok {
			pod = p.pods[ctr.PodSandboxId]
			ctr.State = nri.ContainerState_CONTAINER_STOPPED
		}
		p.lock.Unlock()
		if !ok {
			return reply, fmt.Errorf("unknown container %q", c.Container)
		}
		if p.runtime != nil {
			if c.Op == "stop_container" {
				if _, err := p.runtime.StopContainer(ctx, &nri.StopContainerRequest{Pod: pod, Container: ctr}); err != nil {
					return reply, err
				}
			} else if err := p.runtime.RemoveContainer(ctx, &nri.RemoveContainerRequest{Pod: pod, Container: ctr}); err != nil {
				return reply, err
			}
		}
		if c.Op == "remove_container" {
			p.lock.Lock()
			delete(p.containers, ctr.Id)
			p.lock.Unlock()
		}
		return reply, nil
	case "state":
		p.lock.Lock()
		ids := make([]string, 0, len(p.containers))
		for id := range p.containers {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		states := []cpuState{}
		for _, id := range ids {
			cpus, mems := cpuOf(p.containers[id])
			states = append(states, cpuState{id, cpus, mems})
		}
		reply["containers"], reply["plugins"] = states, p.plugins
		p.lock.Unlock()
		return reply, nil
	}
	return reply, fmt.Errorf("unknown op %q", c.Op)
}

func main() {
	logrus.SetOutput(os.Stderr)
	pluginDir, err := os.MkdirTemp("", "nripeer-plugins-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "nripeer: %v\n", err)
		os.Exit(2)
	}
	defer os.RemoveAll(pluginDir)
	p := &peer{
		out:        json.NewEncoder(os.Stdout),
		pods:       map[string]*nri.PodSandbox{},
		containers: map[string]*nri.Container{},
		pluginC:    make(chan struct{}),
		pluginDir:  pluginDir,
	}
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	ctx := context.Background()
	for scanner.Scan() {
		var c command
		if err := json.Unmarshal(scanner.Bytes(), &c); err != nil {
			p.emit(map[string]any{"error": fmt.Sprintf("bad command: %v", err)})
			continue
		}
		reply, err := p.handle(ctx, &c)
		reply["id"] = c.ID
		if err != nil {
			reply["error"] = err.Error()
		} else {
			reply["ok"] = true
		}
		p.emit(reply)
	}
	if p.runtime != nil {
		p.runtime.Stop()
	}
}
