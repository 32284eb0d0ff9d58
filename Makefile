# Every target that runs Python sets up its own virtualenv first: a fresh machine
# needs only python3 (>= 3.11) and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
PROTO_SRC := protos/k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto \
             protos/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto
GEN_DIR := agent/kubeletapi
# NRI's protocol (github.com/containerd/nri v0.12.5, pkg/api/api.proto), generated into its own package.
NRI_PROTO_SRC := protos/github.com/containerd/nri/pkg/api/api.proto
NRI_GEN_DIR := agent/nriapi
# Messages only: the agent speaks ttrpc itself, and grpc stubs would load grpcio (about 8 MiB of RSS).
NRI_GEN_OPT := client_generation=none,server_generation=none

.PHONY: venv helm test lint demo bench protos check-protos clean process-starter nripeer kubelet-peer apiserver-peer e2e

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

# The Helm CLI for the chart tests (tests/test_chart.py), installed into the venv.
helm: $(STAMP)
	PYTHON=$(PY) bash scripts/install-helm.sh $(BIN)/helm

# The NRI runtime peer for tests/test_nri*.py (upstream NRI's pkg/adaptation in Go), built once per machine
# into ${XDG_CACHE_HOME:-~/.cache}/cpupool/; without `go` it is skipped and so are those tests, saying why.
nripeer:
	@if command -v go >/dev/null; then bash scripts/build-go-peer.sh tests/nripeer; \
	else echo "go is not installed: the NRI tests will be skipped"; fi

# The kubelet peer for tests/test_kubeletpeer.py and the peer-parametrised tests (the kubelet's own device
# manager, k8s.io/kubernetes, in Go), built once per machine into ${XDG_CACHE_HOME:-~/.cache}/cpupool/<hash>/
# (several minutes cold); without `go` it is skipped and so are those tests, saying why.
kubelet-peer:
	@if command -v go >/dev/null; then bash tests/kubeletpeer/build.sh >/dev/null; \
	else echo "go is not installed: the tests against the real kubelet peer will be skipped"; fi

# The real control plane for tests/test_apiserver*.py (kube-apiserver of k8s.io/kubernetes and etcd, one Go
# binary from tests/apiserver), built once per machine into ${XDG_CACHE_HOME:-~/.cache}/cpupool/apiserver-<hash>/
# (8 to 10 minutes cold); without `go` it is skipped and so are those tests, saying why.
apiserver-peer:
	@if command -v go >/dev/null; then bash tests/apiserver/build.sh >/dev/null; \
	else echo "go is not installed: the tests against the real API server will be skipped"; fi

test: $(STAMP) helm nripeer kubelet-peer apiserver-peer
	$(PY) -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check agent tests
	$(BIN)/mypy --strict agent

demo: $(STAMP)
	$(PY) -m tests.demo

# The real-path figures drive the agent through the kubelet peer (built once per machine, as for `make test`).
bench: $(STAMP) kubelet-peer
	$(PY) -m bench.run

# The NRI plugin against a real containerd (built from tests/e2e/go.mod, NRI on), Debian's runc and crictl,
# with the container's cpuset read back from the kernel. Needs root and Go; not part of `make test` or CI.
e2e: $(STAMP)
	$(PY) -m tests.e2e.run

# The process-starter bundle (dist/process-starter/) for application images without Python or libc.
# Needs Debian's python3.11, patchelf and a static libc (apt-get as root), so not part of `make test`;
# tests that run the bundle skip when it is missing.
process-starter:
	bash scripts/build-process-starter.sh

# Regenerate the betterproto2 code (grpclib server bases and async clients) from protos/.
# The compiler formats its output with ruff, so the venv's bin must be on PATH.
protos: $(STAMP)
	rm -rf $(GEN_DIR)
	mkdir -p $(GEN_DIR)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	    --python_betterproto2_out=$(GEN_DIR) \
	    --python_betterproto2_opt=client_generation=async,server_generation=async \
	    $(PROTO_SRC)
	rm -rf $(NRI_GEN_DIR)
	mkdir -p $(NRI_GEN_DIR)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	    --python_betterproto2_out=$(NRI_GEN_DIR) \
	    --python_betterproto2_opt=$(NRI_GEN_OPT) \
	    $(NRI_PROTO_SRC)

# Fails when `make protos` would change the committed generated code.
check-protos: $(STAMP)
	rm -rf .protos-check && mkdir -p .protos-check
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	    --python_betterproto2_out=.protos-check \
	    --python_betterproto2_opt=client_generation=async,server_generation=async \
	    $(PROTO_SRC) >/dev/null
	diff -r .protos-check $(GEN_DIR) || { echo "generated code is stale: run 'make protos'"; rm -rf .protos-check; exit 1; }
	rm -rf .protos-check
	mkdir -p .protos-check
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	    --python_betterproto2_out=.protos-check \
	    --python_betterproto2_opt=$(NRI_GEN_OPT) \
	    $(NRI_PROTO_SRC) >/dev/null
	diff -r .protos-check $(NRI_GEN_DIR) || { echo "generated NRI code is stale: run 'make protos'"; rm -rf .protos-check; exit 1; }
	rm -rf .protos-check

clean:
	rm -rf $(VENV) .protos-check .pytest_cache .mypy_cache .ruff_cache
