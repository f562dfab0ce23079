// echo is the Go program muster-testkit's own tests build and run (see
// src/golang.rs): it greets with its arguments, writes a line to stderr,
// echoes its stdin line by line and says bye at end of input. With
// -ignore-eof it stays up after its stdin is closed, until killed.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

func main() {
	ignoreEOF := flag.Bool("ignore-eof", false, "keep running after stdin ends")
	flag.Parse()
	fmt.Fprintln(os.Stderr, "echo: on stderr")
	fmt.Println("hello " + strings.Join(flag.Args(), " "))
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		fmt.Println("got " + in.Text())
	}
	for *ignoreEOF {
		// (Not select{}: with nothing else running, Go's runtime calls
		// that a deadlock and exits.)
		time.Sleep(time.Hour)
	}
	fmt.Println("bye")
}
