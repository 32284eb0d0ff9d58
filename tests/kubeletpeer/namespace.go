package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
)

const (
	inNamespaceEnv = "CPUPOOL_KUBELETPEER_IN_MOUNT_NS"
	// The path pluginapi.KubeletSocket lives in; NewManagerImpl listens there and nowhere else.
	kubeletPluginDir = "/var/lib/kubelet/device-plugins"
	hiddenRoot       = "/var/lib"
)

// reexecInNamespace runs this program again in a private mount namespace and waits for it; signals are
// passed on, and the child dies with this process (Pdeathsig).
func reexecInNamespace() int {
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeletpeer: cannot find my own executable:", err)
		return 3
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), inNamespaceEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	// Pdeathsig fires when the forking thread exits, not the process: keep this goroutine on its thread.
	runtime.LockOSThread()
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "kubeletpeer: cannot start in a private mount namespace (run as root):", err)
		return 3
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range signals {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if code := exit.ExitCode(); code >= 0 {
			return code
		}
		return 1
	}
	if err != nil {
		return 1
	}
	return 0
}

// enterPluginDir makes the test's plugin directory appear at kubeletPluginDir inside this mount namespace:
// a tmpfs over /var/lib (so nothing is created on the host's /var/lib) and a bind mount of the directory.
func enterPluginDir(o options) error {
	for _, p := range []string{o.pluginDir, o.podResources, o.stateFile} {
		if p == hiddenRoot || strings.HasPrefix(p, hiddenRoot+"/") {
			return fmt.Errorf("%s is under %s, which the peer hides behind a tmpfs; use another directory", p, hiddenRoot)
		}
	}
	if err := os.MkdirAll(o.pluginDir, 0o750); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.podResources), 0o750); err != nil {
		return err
	}
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private in the mount namespace: %w", err)
	}
	if err := syscall.Mount("kubeletpeer", hiddenRoot, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mounting a tmpfs on %s: %w", hiddenRoot, err)
	}
	if err := os.MkdirAll(kubeletPluginDir, 0o750); err != nil {
		return err
	}
	if err := syscall.Mount(o.pluginDir, kubeletPluginDir, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on %s: %w", o.pluginDir, kubeletPluginDir, err)
	}
	return nil
}
