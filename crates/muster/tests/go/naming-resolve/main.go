// naming-resolve resolves an etcd:/// target with the gRPC resolver of
// etcd's naming package (go.etcd.io/etcd/clientv3/naming/resolver, etcd
// 3.4), the code a Go gRPC client runs for grpc.Dial("etcd:///greeter"):
// it calls the builder's Build with a minimal resolver.ClientConn of its
// own, which prints every state the resolver pushes as one JSON line:
//
//	{"event":"ready","target":"etcd:///greeter"}
//	{"event":"update","addrs":[{"addr":"10.0.0.1:50051","metadata":{"zone":"z1"}}]}
//
// "ready" is printed once Build has returned, i.e. once the resolver has
// read the target's endpoints and watches from the next revision. (The
// resolver pushes nothing while the target has no endpoints at all.)
// Addresses are sorted by addr. Errors the resolver reports are printed as
// {"event":"error","error":"..."}.
//
// It stops (closing the resolver) on SIGTERM, SIGINT or when its stdin is
// closed.
//
// Used by muster's integration tests (crates/muster/tests/it/go_naming.rs).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/resolver"
	"go.uber.org/zap"
	gresolver "google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"
)

// printingConn is the resolver.ClientConn a gRPC ClientConn would be: it
// receives the resolver's states and prints them.
type printingConn struct {
	mu sync.Mutex
}

type address struct {
	Addr     string      `json:"addr"`
	Metadata interface{} `json:"metadata"`
}

func (c *printingConn) UpdateState(s gresolver.State) {
	addrs := make([]address, 0, len(s.Addresses))
	for _, a := range s.Addresses {
		addrs = append(addrs, address{Addr: a.Addr, Metadata: a.Metadata})
	}
	sort.Slice(addrs, func(i, j int) bool { return addrs[i].Addr < addrs[j].Addr })
	c.emit(map[string]interface{}{"event": "update", "addrs": addrs})
}

func (c *printingConn) ReportError(err error) {
	c.emit(map[string]interface{}{"event": "error", "error": err.Error()})
}

// NewAddress is the deprecated form of UpdateState.
func (c *printingConn) NewAddress(addrs []gresolver.Address) {
	c.UpdateState(gresolver.State{Addresses: addrs})
}

// NewServiceConfig is deprecated and unused by the etcd resolver.
func (c *printingConn) NewServiceConfig(string) {}

func (c *printingConn) ParseServiceConfig(string) *serviceconfig.ParseResult {
	return &serviceconfig.ParseResult{Err: fmt.Errorf("service configs are not supported here")}
}

func (c *printingConn) emit(v interface{}) {
	line, err := json.Marshal(v)
	if err != nil {
		fail("encode %v: %v", v, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	fmt.Println(string(line))
}

// parseTarget splits scheme://authority/endpoint as grpc.Dial does.
func parseTarget(s string) (gresolver.Target, bool) {
	scheme := strings.SplitN(s, "://", 2)
	if len(scheme) != 2 {
		return gresolver.Target{}, false
	}
	rest := strings.SplitN(scheme[1], "/", 2)
	if len(rest) != 2 {
		return gresolver.Target{}, false
	}
	return gresolver.Target{Scheme: scheme[0], Authority: rest[0], Endpoint: rest[1]}, true
}

func main() {
	endpoint := flag.String("endpoint", "127.0.0.1:2379", "etcd endpoint(s), comma-separated")
	targetFlag := flag.String("target", "", "the gRPC target, e.g. etcd:///greeter")
	flag.Parse()
	target, ok := parseTarget(*targetFlag)
	if !ok || target.Endpoint == "" {
		fail("-target %q is not scheme://authority/endpoint (e.g. etcd:///greeter)", *targetFlag)
	}

	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*endpoint, ","),
		DialTimeout: 10 * time.Second,
		LogConfig:   &zap.Config{Level: zap.NewAtomicLevelAt(zap.WarnLevel), Encoding: "console", OutputPaths: []string{"stderr"}, ErrorOutputPaths: []string{"stderr"}, EncoderConfig: zap.NewDevelopmentEncoderConfig()},
	})
	if err != nil {
		fail("connect: %v", err)
	}
	defer cli.Close()

	builder, err := resolver.NewBuilder(cli)
	if err != nil {
		fail("resolver builder: %v", err)
	}
	if target.Scheme != builder.Scheme() {
		fail("-target's scheme is %q, the resolver's is %q", target.Scheme, builder.Scheme())
	}
	conn := &printingConn{}
	r, err := builder.Build(target, conn, gresolver.BuildOptions{})
	if err != nil {
		fail("build the resolver: %v", err)
	}
	conn.emit(map[string]interface{}{"event": "ready", "target": *targetFlag})

	stop := make(chan string, 2)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() { stop <- (<-signals).String() }()
	go func() {
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		stop <- "stdin closed"
	}()
	why := <-stop
	fmt.Fprintf(os.Stderr, "naming-resolve: stopping (%s)\n", why)
	r.Close()
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "naming-resolve: "+format+"\n", args...)
	os.Exit(1)
}
