package main

import (
	"io"
	"net"
	"os"
	"sync"
)

// frontDoor accepts plugin connections on the public socket and pipes each, byte for byte, to the
// adaptation's private socket, so that closing it drops every plugin connection at once.
type frontDoor struct {
	listener net.Listener
	lock     sync.Mutex
	conns    []net.Conn
	done     sync.WaitGroup
}

func openFrontDoor(public, inner string) (*frontDoor, error) {
	os.Remove(public)
	l, err := net.Listen("unix", public)
	if err != nil {
		return nil, err
	}
	f := &frontDoor{listener: l}
	f.done.Add(1)
	go f.accept(inner)
	return f, nil
}

func (f *frontDoor) accept(inner string) {
	defer f.done.Done()
	for {
		outer, err := f.listener.Accept()
		if err != nil {
			return
		}
		back, err := net.Dial("unix", inner)
		if err != nil {
			outer.Close()
			continue
		}
		f.lock.Lock()
		f.conns = append(f.conns, outer, back)
		f.lock.Unlock()
		go pipe(outer, back)
		go pipe(back, outer)
	}
}

func pipe(dst, src net.Conn) {
	io.Copy(dst, src)
	dst.Close()
	src.Close()
}

func (f *frontDoor) close() {
	f.listener.Close() // removes the socket file
	f.done.Wait()
	f.lock.Lock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
	f.lock.Unlock()
}
