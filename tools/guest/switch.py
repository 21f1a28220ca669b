#!/usr/bin/env python3
"""A learning Ethernet switch for the ordinal test guests (python3 standard library only).

qemu's datagram netdevs are point to point, so to put three guests on one L2 segment each guest's
NIC talks to its own port of this switch. Port NAME is the unix datagram socket DIR/NAME.switch;
the guest's NIC is DIR/NAME.nic (qemu: -netdev dgram,local.path=DIR/NAME.nic,remote.path=DIR/NAME.switch).
Unix sockets in the run directory need no port numbers, so concurrent runs cannot collide, and
nothing is reachable from the network.

Frames from a port teach the switch where their source MAC lives. Unicast to a known MAC goes to
its port only; broadcast, multicast and unknown unicast go to every other port. A guest whose
qemu died (kill -9) just stops answering: frames for it are dropped, the others carry on.

A unix datagram receiver queues only a few frames (net.unix.max_dgram_qlen, 10 by default), so a
busy guest can refuse a frame for a moment (EAGAIN). Such frames wait in a bounded per-port queue
until the guest's socket is writable again, instead of being lost (RDMA over a lossy link
retransmits, but only after a timeout).

Usage: switch.py --dir DIR NAME...
Creates DIR/ready once every port is bound. Exits on SIGTERM or SIGINT (cluster.sh starts it with
setpriv --pdeathsig TERM, so it also ends when cluster.sh dies).
"""

import argparse
import collections
import os
import selectors
import signal
import socket
import sys

QUEUE_LIMIT = 2048  # frames waiting for one slow guest before further frames are dropped


class Port:
    def __init__(self, directory, name):
        self.name = name
        self.peer = os.path.join(directory, name + ".nic")
        path = os.path.join(directory, name + ".switch")
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.connected = False
        self.queue = collections.deque()
        self.rx = self.tx = self.dropped = 0

    def _send(self, frame):
        """One attempt. True: sent or dropped for good; False: the guest's queue is full (EAGAIN).

        The socket is connected to the guest's NIC socket once that exists: then poll() reports
        it writable only when the guest has room (unconnected, it would always look writable
        and a full guest would make the switch spin).
        """
        try:
            if not self.connected:
                self.sock.connect(self.peer)
                self.connected = True
            self.sock.send(frame)
            self.tx += 1
        except BlockingIOError:
            return False
        except OSError:  # the guest's qemu is not up yet, or is gone
            self.dropped += 1
        return True

    def send(self, frame):
        """Send or queue a frame. Returns True if the port must now wait until it is writable."""
        if self.queue:
            if len(self.queue) >= QUEUE_LIMIT:
                self.dropped += 1
            else:
                self.queue.append(frame)
            return False
        if self._send(frame):
            return False
        self.queue.append(frame)
        return True

    def flush(self):
        """Send queued frames until the guest is full again. Returns True while frames remain."""
        while self.queue:
            if not self._send(self.queue[0]):
                return True
            self.queue.popleft()
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="directory for the sockets")
    parser.add_argument("names", nargs="+", help="one port per guest")
    args = parser.parse_args()

    ports = [Port(args.dir, name) for name in args.names]
    where = {}  # MAC (6 bytes) -> Port
    selector = selectors.DefaultSelector()
    for port in ports:
        selector.register(port.sock, selectors.EVENT_READ, port)

    def want_write(port, on):
        selector.modify(port.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), port)

    class Stop(Exception):
        pass

    def stop(_signum, _frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        with open(os.path.join(args.dir, "ready"), "w") as ready:
            ready.write(" ".join(p.name for p in ports) + "\n")
        print("switch: ports " + " ".join(p.name for p in ports), flush=True)
        serve(ports, where, selector, want_write)
    except Stop:
        pass
    for port in ports:
        print(f"switch: {port.name}: rx {port.rx} tx {port.tx} dropped {port.dropped} "
              f"queued {len(port.queue)}", flush=True)
    return 0


def serve(ports, where, selector, want_write):
    while True:
        for key, mask in selector.select():
            port = key.data
            if mask & selectors.EVENT_WRITE:
                want_write(port, port.flush())
            if not mask & selectors.EVENT_READ:
                continue
            while True:  # drain everything this port has queued for us
                try:
                    frame = port.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if len(frame) < 14:
                    continue
                port.rx += 1
                dst, src = frame[0:6], frame[6:12]
                if not src[0] & 1:
                    where[src] = port
                out = where.get(dst) if not dst[0] & 1 else None
                targets = [out] if out is not None else ports
                for target in targets:
                    if target is not port and target.send(frame):
                        want_write(target, True)


if __name__ == "__main__":
    sys.exit(main())
