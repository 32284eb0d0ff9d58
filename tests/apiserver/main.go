// Command apiserver-peer is a real Kubernetes control plane for cpupool's tests: one binary that runs either
// the kube-apiserver of k8s.io/kubernetes (the same release as tests/kubeletpeer) or the etcd server that
// stores its objects, chosen by the first argument:
//
//	apiserver-peer etcd --data-dir ... --listen-client-urls ...
//	apiserver-peer kube-apiserver --etcd-servers ... --secure-port ...
//
// One binary rather than two: the two share most of their dependency tree (gRPC, protobuf, the etcd client),
// so one link step and one cached file cost less on a 2-core machine. Each subcommand runs as its own process;
// nothing is shared at run time. The flags are those of the upstream commands, untouched.
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // kube-apiserver validates CronJob time zones against it

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // kube-apiserver's --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // the client-go metrics kube-apiserver registers
	_ "k8s.io/component-base/metrics/prometheus/version"  // its version metric
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

const usage = "usage: apiserver-peer etcd|kube-apiserver [flags of that command]"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	// Each upstream main reads its own argv with its program name first: hand it argv without ours.
	args := os.Args[1:]
	switch args[0] {
	case "etcd":
		etcdmain.Main(args)
	case "kube-apiserver":
		os.Args = args
		os.Exit(cli.Run(app.NewAPIServerCommand()))
	default:
		fmt.Fprintf(os.Stderr, "apiserver-peer: unknown command %q\n%s\n", args[0], usage)
		os.Exit(2)
	}
}
