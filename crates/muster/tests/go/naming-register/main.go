// naming-register registers one endpoint the way a Go service does with
// etcd's naming package (go.etcd.io/etcd/clientv3/naming/endpoints, etcd
// 3.4): endpoints.NewManager(cli, target).AddEndpoint(...) under a lease it
// keeps alive.
//
// It prints one JSON line per event on stdout:
//
//	{"event":"ready","key":"greeter/10.0.0.1:50051","lease":1234}
//	{"event":"removed","key":"greeter/10.0.0.1:50051"}
//
// and stops, deleting the endpoint and revoking the lease, on SIGTERM,
// SIGINT or when its stdin is closed. Killed (SIGKILL), it leaves the key to
// expire with the lease. Errors go to stderr with a non-zero exit status.
//
// Used by muster's integration tests (crates/muster/tests/it/go_naming.rs).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/endpoints"
	"go.uber.org/zap"
)

func main() {
	endpoint := flag.String("endpoint", "127.0.0.1:2379", "etcd endpoint(s), comma-separated")
	target := flag.String("target", "", "the naming target (service name), e.g. greeter")
	addr := flag.String("addr", "", "the endpoint's address, host:port")
	key := flag.String("key", "", "the key (default {target}/{addr})")
	metadata := flag.String("metadata", "", "the endpoint's metadata, as JSON (default none)")
	ttl := flag.Int64("ttl", 5, "lease TTL in seconds")
	flag.Parse()
	if *target == "" || *addr == "" {
		fail("-target and -addr are required")
	}
	if *key == "" {
		*key = *target + "/" + *addr
	}
	var meta interface{}
	if *metadata != "" {
		if err := json.Unmarshal([]byte(*metadata), &meta); err != nil {
			fail("-metadata is not JSON: %v", err)
		}
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

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	lease, err := cli.Grant(ctx, *ttl)
	cancel()
	if err != nil {
		fail("grant a lease: %v", err)
	}
	alive, err := cli.KeepAlive(context.Background(), lease.ID)
	if err != nil {
		fail("keep the lease alive: %v", err)
	}

	em, err := endpoints.NewManager(cli, *target)
	if err != nil {
		fail("endpoints manager: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	err = em.AddEndpoint(ctx, *key, endpoints.Endpoint{Addr: *addr, Metadata: meta}, clientv3.WithLease(lease.ID))
	cancel()
	if err != nil {
		fail("add the endpoint: %v", err)
	}
	emit(map[string]interface{}{"event": "ready", "key": *key, "lease": int64(lease.ID)})

	stop := make(chan string, 2)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() { stop <- (<-signals).String() }()
	go func() {
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		stop <- "stdin closed"
	}()

	for {
		select {
		case why := <-stop:
			fmt.Fprintf(os.Stderr, "naming-register: stopping (%s)\n", why)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := em.DeleteEndpoint(ctx, *key); err != nil {
				fail("delete the endpoint: %v", err)
			}
			if _, err := cli.Revoke(ctx, lease.ID); err != nil {
				fail("revoke the lease: %v", err)
			}
			cancel()
			emit(map[string]interface{}{"event": "removed", "key": *key})
			return
		case _, ok := <-alive:
			if !ok {
				fail("the lease is lost (keep-alive channel closed)")
			}
		}
	}
}

func emit(v interface{}) {
	line, err := json.Marshal(v)
	if err != nil {
		fail("encode %v: %v", v, err)
	}
	fmt.Println(string(line))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "naming-register: "+format+"\n", args...)
	os.Exit(1)
}
