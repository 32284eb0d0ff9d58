package main

import (
	"fmt"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"k8s.io/apimachinery/pkg/util/sets"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

// The device manager keeps per-device health, endpoints and registered clients in unexported fields, and no
// exported method returns unhealthy device IDs or which endpoint serves a resource. Tests need exactly that
// view, so it is read here with reflection under the manager's own locks (read-only). A field renamed in a
// later release turns into an error reply that names it, not into wrong data.

type fieldError struct{ msg string }

func field(v reflect.Value, name string) reflect.Value {
	f := v.FieldByName(name)
	if !f.IsValid() {
		panic(fieldError{fmt.Sprintf("%s has no field %q (kubelet release changed?)", v.Type(), name)})
	}
	if !f.CanAddr() {
		panic(fieldError{fmt.Sprintf("%s.%s is not addressable", v.Type(), name)})
	}
	return reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem()
}

// addressable copies a (struct) value so that its fields can be opened.
func addressable(v reflect.Value) reflect.Value {
	c := reflect.New(v.Type()).Elem()
	c.Set(v)
	return c
}

type endpointView struct {
	Socket             string  `json:"socket"`
	Stopped            bool    `json:"stopped"`
	StoppedForS        float64 `json:"stopped_for_s"`
	HasOptions         bool    `json:"has_options"`
	PreferredAvailable bool    `json:"get_preferred_allocation_available"`
	PreStartRequired   bool    `json:"pre_start_required"`
}

// resourceView lists device IDs, not device objects: a shared pool has thousands of devices, and this view
// is sent after every change.
type resourceView struct {
	Healthy   []string `json:"healthy"`
	Unhealthy []string `json:"unhealthy"`
	// NUMA node -> IDs of the devices the plugin placed there (devices without topology are in none).
	NUMA map[string][]string `json:"numa"`
	// Health as the plugin last reported it, for the devices where that is not "Healthy".
	Reported  map[string]string `json:"reported_health"`
	InUse     []string          `json:"in_use"`
	Endpoint  *endpointView     `json:"endpoint"`
	Endpoints []endpointView    `json:"endpoints"`
	Clients   []string          `json:"clients"`
}

func endpointOf(info reflect.Value) endpointView {
	info = addressable(info)
	var view endpointView
	if opts, _ := field(info, "opts").Interface().(*pluginapi.DevicePluginOptions); opts != nil {
		view.HasOptions = true
		view.PreferredAvailable = opts.GetPreferredAllocationAvailable
		view.PreStartRequired = opts.PreStartRequired
	}
	e := field(info, "e")
	if e.IsNil() {
		return view
	}
	impl := e.Elem()
	if impl.Kind() == reflect.Pointer {
		impl = impl.Elem()
	}
	mu := field(impl, "mutex").Addr().Interface().(*sync.Mutex)
	mu.Lock()
	view.Socket = field(impl, "socket").String()
	stop := field(impl, "stopTime").Interface().(time.Time)
	mu.Unlock()
	if view.Socket != "" {
		view.Socket = filepath.Base(view.Socket)
	}
	if !stop.IsZero() {
		view.Stopped = true
		view.StoppedForS = time.Since(stop).Seconds()
	}
	return view
}

func (p *peer) snapshot() (result map[string]any, err error) {
	defer func() {
		if r := recover(); r != nil {
			fe, ok := r.(fieldError)
			if !ok {
				panic(r)
			}
			result, err = nil, fmt.Errorf("reading the device manager's state: %s", fe.msg)
		}
	}()
	covered := logSeq.Load()
	m := reflect.ValueOf(p.manager).Elem()
	views := map[string]*resourceView{}
	view := func(name string) *resourceView {
		v := views[name]
		if v == nil {
			v = &resourceView{
				Healthy: []string{}, Unhealthy: []string{}, NUMA: map[string][]string{}, Reported: map[string]string{},
				InUse: []string{}, Endpoints: []endpointView{}, Clients: []string{},
			}
			views[name] = v
		}
		return v
	}

	// Under the device manager's mutex only references are taken (and the small sets it changes in place
	// are copied); the walk over every device ID runs after the unlock. With a 200,000-device pool the walk
	// takes a few hundred milliseconds, and held under the mutex it delayed the device manager's own work:
	// the update that follows a new list (genericDeviceUpdateCallback, then writeCheckpoint, both take the
	// mutex) and Allocate. No kubelet has this observer, so it must not slow what the tests and benchmarks
	// time. Safe because the device manager (v1.37.2, manager.go) never changes a healthy or unhealthy set,
	// or a resource's device map, after it released the mutex: every update makes new ones
	// (genericDeviceUpdateCallback, markResourceUnhealthy, readCheckpoint). allocatedDevices is changed in
	// place (Allocate inserts into it): it is copied under the mutex.
	type deviceRefs struct {
		healthy, unhealthy sets.Set[string]
		devices            devicemanager.DeviceInstances
	}
	refs := map[string]*deviceRefs{}
	ref := func(name string) *deviceRefs {
		r := refs[name]
		if r == nil {
			r = &deviceRefs{}
			refs[name] = r
		}
		return r
	}
	mu := field(m, "mutex").Addr().Interface().(*sync.Mutex)
	lockedAt := time.Now()
	mu.Lock()
	func() {
		defer mu.Unlock()
		for name, ids := range field(m, "healthyDevices").Interface().(map[string]sets.Set[string]) {
			ref(name).healthy = ids
		}
		for name, ids := range field(m, "unhealthyDevices").Interface().(map[string]sets.Set[string]) {
			ref(name).unhealthy = ids
		}
		for name, devices := range field(m, "allDevices").Interface().(devicemanager.ResourceDeviceInstances) {
			ref(name).devices = devices
		}
		for name, ids := range field(m, "allocatedDevices").Interface().(map[string]sets.Set[string]) {
			view(name).InUse = sets.List(ids)
		}
		endpoints := field(m, "endpoints")
		for it := endpoints.MapRange(); it.Next(); {
			ep := endpointOf(it.Value())
			view(it.Key().String()).Endpoint = &ep
		}
		store := field(m, "endpointStore")
		for it := store.MapRange(); it.Next(); {
			name := it.Key().String()
			for inner := it.Value().MapRange(); inner.Next(); {
				view(name).Endpoints = append(view(name).Endpoints, endpointOf(inner.Value().Elem()))
			}
		}
	}()
	held := time.Since(lockedAt)

	for name, r := range refs {
		v := view(name)
		add := func(id string, isHealthy bool) {
			if isHealthy {
				v.Healthy = append(v.Healthy, id)
			} else {
				v.Unhealthy = append(v.Unhealthy, id)
			}
			pd := r.devices[id]
			if pd == nil {
				return
			}
			if pd.Health != pluginapi.Healthy {
				v.Reported[id] = pd.Health
			}
			if pd.Topology != nil {
				for _, n := range pd.Topology.Nodes {
					node := strconv.FormatInt(n.ID, 10)
					v.NUMA[node] = append(v.NUMA[node], id)
				}
			}
		}
		for id := range r.healthy {
			add(id, true)
		}
		for id := range r.unhealthy {
			add(id, false)
		}
	}

	server := field(m, "server").Elem()
	if server.Kind() == reflect.Pointer {
		server = server.Elem()
	}
	smu := field(server, "mutex").Addr().Interface().(*sync.Mutex)
	smu.Lock()
	clients := field(server, "clients").Interface().(map[string][]plugin.Client)
	for name, cs := range clients {
		for _, c := range cs {
			view(name).Clients = append(view(name).Clients, filepath.Base(c.SocketPath()))
		}
	}
	smu.Unlock()

	out := map[string]any{}
	for name, v := range views {
		sort.Strings(v.Healthy)
		sort.Strings(v.Unhealthy)
		sort.Slice(v.Endpoints, func(i, j int) bool { return v.Endpoints[i].Socket < v.Endpoints[j].Socket })
		sort.Strings(v.Clients)
		out[name] = v
	}
	return map[string]any{
		"resources": out, "pods": p.podsWithDevices(), "log_seq": covered,
		// How long the device manager's mutex was held for this snapshot (waiting for it included).
		"manager_lock_s": held.Seconds(),
	}, nil
}

// stateEmitter sends a "state" event after changes (log lines, commands), coalescing bursts. It never runs
// inside a log call: the device manager logs while holding its mutex, which the snapshot takes.
//
// The driver can pause it (op "observe"): a benchmark that times the device manager's own work from its log
// lines pauses it, since each snapshot of a 200,000-device pool is a walk, a sort and megabytes of JSON
// (for the driver to parse as well) that compete with the device manager for the CPUs. A kubelet has no such
// observer. Changes while paused are snapshotted when it resumes.
type stateEmitter struct {
	p      *peer
	wake   chan struct{}
	paused atomic.Bool
}

func newStateEmitter(p *peer) *stateEmitter {
	s := &stateEmitter{p: p, wake: make(chan struct{}, 1)}
	go s.run()
	return s
}

func (s *stateEmitter) poke() {
	if s.paused.Load() {
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// observe pauses (false) or resumes (true) the snapshots; resuming takes one at once.
func (s *stateEmitter) observe(on bool) {
	s.paused.Store(!on)
	if on {
		s.poke()
	}
}

func (s *stateEmitter) run() {
	for range s.wake {
		if s.paused.Load() {
			continue // poked before the pause
		}
		snap, err := s.p.snapshot()
		if err != nil {
			s.p.out.event("state_error", map[string]any{"error": err.Error()})
			continue
		}
		s.p.out.event("state", snap)
	}
}
