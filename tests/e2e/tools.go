//go:build tools

// Package e2e pins the real container runtime pieces `make e2e` builds: containerd (with NRI) and crictl.
package e2e

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
)
