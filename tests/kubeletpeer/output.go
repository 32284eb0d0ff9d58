package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// monotonic is CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic(), so the driver can compare
// the peer's event times with its own.
func monotonic() float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

// output serialises every line written to stdout: replies and events interleave, one JSON object a line.
type output struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func newOutput(w io.Writer) *output { return &output{w: bufio.NewWriterSize(w, 1<<16)} }

func (o *output) write(v map[string]any) {
	data, err := json.Marshal(v)
	if err != nil {
		data, _ = json.Marshal(map[string]any{"event": "encode_error", "error": err.Error()})
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	_, _ = o.w.Write(data)
	_ = o.w.WriteByte('\n')
	_ = o.w.Flush()
}

func (o *output) event(kind string, fields map[string]any) {
	if fields == nil {
		fields = map[string]any{}
	}
	fields["event"] = kind
	fields["t"] = monotonic()
	o.write(fields)
}

func (o *output) reply(id int64, result map[string]any, err error) {
	msg := map[string]any{"id": id, "ok": err == nil, "t": monotonic()}
	if err != nil {
		msg["error"] = err.Error()
	} else {
		msg["result"] = result
	}
	o.write(msg)
}

// -- klog: the device manager's log lines become events, which is how the driver sees Register calls,
// ListAndWatch messages and stream ends inside the kubelet's code. --

const logVerbosity = 2

var (
	hookMu  sync.Mutex
	logHook func()
	// logSeq numbers log events. A state snapshot carries the number of the last log event before it began:
	// whatever that log line reported (the device manager logs after it updated its state) is in it.
	logSeq atomic.Int64
)

// setLogHook registers a function called after every log event (it must not block or take kubelet locks:
// the device manager logs while holding its mutex).
func setLogHook(f func()) {
	hookMu.Lock()
	defer hookMu.Unlock()
	logHook = f
}

func callHook() {
	hookMu.Lock()
	f := logHook
	hookMu.Unlock()
	if f != nil {
		f()
	}
}

type sink struct {
	out    *output
	name   string
	values []any
}

func installLogger(out *output) klog.Logger {
	logger := logr.New(&sink{out: out})
	// ContextualLogger: klog.Background() (what FromContext gives the kubelet code without a logger in the
	// context, as in gRPC handlers) must be this logger, not klog's legacy one with its own verbosity.
	klog.SetLoggerWithOptions(logger, klog.ContextualLogger(true))
	return logger
}

func (s *sink) Init(logr.RuntimeInfo)  {}
func (s *sink) Enabled(level int) bool { return level <= logVerbosity }

func (s *sink) emit(level int, err error, msg string, kv []any) {
	fields := map[string]any{"msg": msg, "level": level, "seq": logSeq.Add(1)}
	if s.name != "" {
		fields["logger"] = s.name
	}
	values := map[string]any{}
	all := append(append([]any{}, s.values...), kv...)
	for i := 0; i+1 < len(all); i += 2 {
		values[fmt.Sprint(all[i])] = plain(all[i+1])
	}
	fields["kv"] = values
	if err != nil {
		fields["error"] = err.Error()
	}
	s.out.event("log", fields)
	callHook()
}

func plain(v any) any {
	switch x := v.(type) {
	case nil, string, bool, int, int32, int64, uint, uint32, uint64, float32, float64:
		return x
	case error:
		return x.Error()
	case fmt.Stringer:
		return x.String()
	}
	return fmt.Sprint(v)
}

func (s *sink) Info(level int, msg string, kv ...any) { s.emit(level, nil, msg, kv) }
func (s *sink) Error(err error, msg string, kv ...any) {
	if err == nil {
		err = fmt.Errorf("(nil error)")
	}
	s.emit(0, err, msg, kv)
}

func (s *sink) WithValues(kv ...any) logr.LogSink {
	return &sink{out: s.out, name: s.name, values: append(append([]any{}, s.values...), kv...)}
}

func (s *sink) WithName(name string) logr.LogSink {
	n := name
	if s.name != "" {
		n = s.name + "/" + name
	}
	return &sink{out: s.out, name: n, values: s.values}
}
