// udp-echo PORT: answers every UDP datagram to PORT with its own bytes, until killed.
//
// The e2e network tests publish a UDP port of a busybox container, and busybox (Debian's
// busybox-static) has no UDP server: this one, static, is bind-mounted in
// (tests/e2e/udp_echo.py builds it).
package main

import (
	"fmt"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: udp-echo PORT")
		os.Exit(2)
	}
	conn, err := net.ListenPacket("udp", ":"+os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "udp-echo:", err)
		os.Exit(1)
	}
	buffer := make([]byte, 65536)
	for {
		n, peer, err := conn.ReadFrom(buffer)
		if err != nil {
			fmt.Fprintln(os.Stderr, "udp-echo:", err)
			os.Exit(1)
		}
		if _, err := conn.WriteTo(buffer[:n], peer); err != nil {
			fmt.Fprintln(os.Stderr, "udp-echo:", err)
		}
	}
}
