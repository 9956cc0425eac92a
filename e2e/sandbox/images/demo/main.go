// Command demo is the stateful workload of the kube-migros tests: it keeps state only in memory and
// reports it, so that a test can tell whether a migration kept it.
//
//	demo serve  --status :8080 [--listen :9000] [--touch 256Mi] [--note /path] [--verbose] [--rxe /dir --qps N --mrs N]
//	demo stream --to host:port [--status :8080]
//	demo cat /path
//
// serve counts ticks (every 10 ms) and keeps a SHA-256 over every tick and every byte it receives on
// --listen; GET-like connections to --status get one line:
//
//	id=<hex> counter=<ticks> hash=<hex> received=<bytes> gaps=<count> maxgap_ms=<ms> conns=<n> answered=<n> maxrtt_ms=<ms> pauses_ms=<ms>,<ms>,...
//
// id is random per process start: a restored process keeps it, a restarted one does not.
// stream connects to --to and sends a numbered, timestamped 64-byte record every 10 ms; serve
// checks the numbering (a skipped or repeated number counts as a gap in the data), keeps the
// longest pause between records as its own clock saw it (maxgap_ms), and sends every record
// back. The stream is the judge of a migration's pause: its status line counts the records sent
// (counter) and answered, the answers out of order (gaps), the longest time between two answers
// (maxgap_ms), each time between two answers longer than 100 ms (pauses_ms, the last 32: one per
// move of the workload) and the longest round trip of a record (maxrtt_ms), all on its own clock,
// which a migration of the workload does not touch. --touch keeps that
// much memory written, so that checkpoints have a known size. --note writes the process id into a
// file of the container's own filesystem at the start (a restored container must still have it);
// cat prints a file (the image has no shell), for `kubectl exec`. --verbose logs every status
// request on stdout (the container's log).
//
// --rxe stands for the verbs an RDMA application calls at its start, on machines without RDMA: it
// takes --qps queue-pair numbers and --mrs memory-region numbers from the simulated rxe counters
// in that directory (last_qpn, last_mrn: each number is the counter plus one, written back, as
// rxe hands them out) and adds them to the status line as qpns=<n>,<n>,... mrns=<n>,... (a
// restored process keeps the numbers it got; a restarted one takes new ones).
//
// Sockets are plain TCP: Go uses multipath TCP for listeners by default, which CRIU cannot dump
// ("inet: Unsupported proto 262").
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

const tick = 10 * time.Millisecond

// A time between two answers longer than this is a pause of the workload (a tick is 10 ms).
const pauseAbove = 100 * time.Millisecond

// The pauses a stream keeps, the latest.
const keptPauses = 32

type state struct {
	id       string
	mu       sync.Mutex
	counter  uint64
	hash     [32]byte
	received uint64
	gaps     uint64
	maxGap   time.Duration
	conns    uint64
	answered uint64
	maxRTT   time.Duration
	pauses   []time.Duration
	// The simulated rxe numbers (--rxe), when taken.
	rxe string
}

func (s *state) mix(data []byte) {
	h := sha256.New()
	h.Write(s.hash[:])
	h.Write(data)
	copy(s.hash[:], h.Sum(nil))
}

func (s *state) line() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	pauses := make([]string, len(s.pauses))
	for i, p := range s.pauses {
		pauses[i] = strconv.FormatInt(p.Milliseconds(), 10)
	}
	return fmt.Sprintf("id=%s counter=%d hash=%s received=%d gaps=%d maxgap_ms=%d conns=%d answered=%d maxrtt_ms=%d pauses_ms=%s%s\n",
		s.id, s.counter, hex.EncodeToString(s.hash[:]), s.received, s.gaps, s.maxGap.Milliseconds(), s.conns,
		s.answered, s.maxRTT.Milliseconds(), strings.Join(pauses, ","), s.rxe)
}

// takeNumbers takes n numbers from the rxe counter file path: each is the counter plus one,
// written back (what rxe does for each queue pair or memory region it creates).
func takeNumbers(path string, n int) ([]string, error) {
	var got []string
	for i := 0; i < n; i++ {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		last, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		next := last + 1
		if err := os.WriteFile(path, []byte(strconv.FormatUint(next, 10)+"\n"), 0o644); err != nil {
			return nil, err
		}
		got = append(got, strconv.FormatUint(next, 10))
	}
	return got, nil
}

func parseSize(v string) (int, error) {
	units := map[string]int{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
	for suffix, mult := range units {
		if strings.HasSuffix(v, suffix) {
			n, err := strconv.Atoi(strings.TrimSuffix(v, suffix))
			return n * mult, err
		}
	}
	return strconv.Atoi(v)
}

func newState() *state {
	var id [8]byte
	rand.Read(id[:])
	return &state{id: hex.EncodeToString(id[:])}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: demo serve|stream [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "stream":
		stream(os.Args[2:])
	case "cat":
		for _, path := range os.Args[2:] {
			data, err := os.ReadFile(path)
			if err != nil {
				fmt.Fprintf(os.Stderr, "demo: %v\n", err)
				os.Exit(1)
			}
			os.Stdout.Write(data)
		}
	default:
		fmt.Fprintf(os.Stderr, "demo: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
}

func serve(args []string) {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	status := flags.String("status", ":8080", "address of the status endpoint")
	listen := flags.String("listen", "", "address that accepts streams")
	touch := flags.String("touch", "0", "memory to keep written (e.g. 256Mi)")
	note := flags.String("note", "", "file to write the process id into at the start")
	verbose := flags.Bool("verbose", false, "log every status request on stdout")
	verify := flags.String("verify", "", "address that answers whether every touched page holds what was written (reads them all)")
	rxe := flags.String("rxe", "", "directory of the simulated rxe counters (last_qpn, last_mrn) to take numbers from at the start")
	qps := flags.Int("qps", 0, "queue-pair numbers to take from --rxe")
	mrs := flags.Int("mrs", 0, "memory-region numbers to take from --rxe")
	flags.Parse(args)
	size, err := parseSize(*touch)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: --touch %q: %v\n", *touch, err)
		os.Exit(2)
	}
	s := newState()
	if *note != "" {
		if err := os.WriteFile(*note, []byte(s.id+"\n"), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "demo: --note: %v\n", err)
			os.Exit(1)
		}
	}
	if *rxe != "" {
		qpns, err := takeNumbers(*rxe+"/last_qpn", *qps)
		if err == nil {
			var mrns []string
			mrns, err = takeNumbers(*rxe+"/last_mrn", *mrs)
			s.rxe = fmt.Sprintf(" qpns=%s mrns=%s", strings.Join(qpns, ","), strings.Join(mrns, ","))
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "demo: --rxe: %v\n", err)
			os.Exit(1)
		}
	}
	memory := make([]byte, size)
	for i := 0; i < len(memory); i += 4096 {
		memory[i] = pageSeed(i / 4096)
	}
	go statusLoop(*status, s, *verbose)
	if *verify != "" {
		go verifyLoop(*verify, s, memory)
	}
	if *listen != "" {
		go acceptStreams(*listen, s)
	}
	var buf [8]byte
	for range time.Tick(tick) {
		s.mu.Lock()
		s.counter++
		binary.BigEndian.PutUint64(buf[:], s.counter)
		s.mix(buf[:])
		if len(memory) > 0 {
			memory[(s.counter*4096)%uint64(len(memory))]++
		}
		s.mu.Unlock()
	}
}

// listen opens a plain (not multipath) TCP listener.
func listen(addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", addr)
}

// pageSeed is what the first byte of page p holds before the ticks count on it (not zero for most
// pages, so that a page that came back empty shows).
func pageSeed(p int) byte {
	return byte(p*7 + 1)
}

// verifyLoop answers each connection with "memok=<bool> pages=<n> bad=<n>": whether the first
// byte of every page is its seed plus the ticks that landed on it (tick c adds one to page
// c mod pages).
func verifyLoop(addr string, s *state, memory []byte) {
	serveLines("verify", addr, func() string {
		s.mu.Lock()
		defer s.mu.Unlock()
		pages := uint64(len(memory) / 4096)
		bad := 0
		for p := uint64(0); p < pages; p++ {
			// The ticks c in [1, counter] with c mod pages == p.
			ticks := s.counter / pages
			if p != 0 && p <= s.counter%pages {
				ticks++
			}
			if memory[p*4096] != pageSeed(int(p))+byte(ticks) {
				bad++
			}
		}
		return fmt.Sprintf("memok=%t pages=%d bad=%d\n", bad == 0, pages, bad)
	})
}

func statusLoop(addr string, s *state, verbose bool) {
	serveLines("status", addr, func() string {
		line := s.line()
		if verbose {
			fmt.Print("demo: status ", line)
		}
		return line
	})
}

// serveLines answers every connection to addr with one line of answer() and closes it.
func serveLines(what, addr string, answer func() string) {
	l, err := listen(addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %s %s: %v\n", what, addr, err)
		os.Exit(1)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		io.WriteString(c, answer())
		c.Close()
	}
}

func acceptStreams(addr string, s *state) {
	l, err := listen(addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: listen %s: %v\n", addr, err)
		os.Exit(1)
	}
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		s.mu.Lock()
		s.conns++
		s.mu.Unlock()
		go receive(c, s)
	}
}

func receive(c net.Conn, s *state) {
	defer c.Close()
	record := make([]byte, 64)
	var expected uint64
	last := time.Now()
	for {
		if _, err := io.ReadFull(c, record); err != nil {
			return
		}
		now := time.Now()
		seq := binary.BigEndian.Uint64(record[:8])
		s.mu.Lock()
		if expected != 0 && seq != expected {
			s.gaps++
		}
		expected = seq + 1
		if pause := now.Sub(last); pause > s.maxGap {
			s.maxGap = pause
		}
		last = now
		s.received += uint64(len(record))
		s.mix(record)
		s.mu.Unlock()
		if _, err := c.Write(record); err != nil {
			return
		}
	}
}

// answers reads the records c sends back and keeps, on the stream's own clock, the longest time
// between two answers and the longest round trip.
func answers(c net.Conn, s *state) {
	record := make([]byte, 64)
	expected := uint64(1)
	var last time.Time
	for {
		if _, err := io.ReadFull(c, record); err != nil {
			return
		}
		now := time.Now()
		seq := binary.BigEndian.Uint64(record[:8])
		sent := time.Unix(0, int64(binary.BigEndian.Uint64(record[8:16])))
		s.mu.Lock()
		if seq != expected {
			s.gaps++
		}
		expected = seq + 1
		s.answered++
		if !last.IsZero() && now.Sub(last) > s.maxGap {
			s.maxGap = now.Sub(last)
		}
		if !last.IsZero() && now.Sub(last) > pauseAbove {
			s.pauses = append(s.pauses, now.Sub(last))
			if len(s.pauses) > keptPauses {
				s.pauses = s.pauses[1:]
			}
		}
		if rtt := now.Sub(sent); rtt > s.maxRTT {
			s.maxRTT = rtt
		}
		last = now
		s.mu.Unlock()
	}
}

func stream(args []string) {
	flags := flag.NewFlagSet("stream", flag.ExitOnError)
	to := flags.String("to", "", "host:port of a demo serve --listen")
	status := flags.String("status", ":8080", "address of the status endpoint")
	flags.Parse(args)
	s := newState()
	go statusLoop(*status, s, false)
	var c net.Conn
	var err error
	var dialer net.Dialer
	dialer.SetMultipathTCP(false)
	for c == nil {
		if c, err = dialer.Dial("tcp", *to); err != nil {
			c = nil
			time.Sleep(100 * time.Millisecond)
		}
	}
	go answers(c, s)
	record := make([]byte, 64)
	for seq := uint64(1); ; seq++ {
		binary.BigEndian.PutUint64(record[:8], seq)
		binary.BigEndian.PutUint64(record[8:16], uint64(time.Now().UnixNano()))
		if _, err := c.Write(record); err != nil {
			fmt.Fprintf(os.Stderr, "demo: stream to %s broke after %d records: %v\n", *to, seq-1, err)
			os.Exit(1)
		}
		s.mu.Lock()
		s.counter = seq
		s.mix(record)
		s.mu.Unlock()
		time.Sleep(tick)
	}
}
