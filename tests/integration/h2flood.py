"""A minimal raw HTTP/2 client for abuse tests: opens gRPC streams that never send their request
(idle streams) or resets them right after their HEADERS (rapid reset), on one connection to a
Unix socket. Every loop is bounded; the connection closes when the object is closed.

Also usable from the command line for measurements:
    python3 h2flood.py idle SOCKET COUNT HOLD_SECONDS
    python3 h2flood.py reset SOCKET COUNT
"""
import socket
import struct
import sys
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL = 8
INITIAL_WINDOW_SIZE = 4
DEFAULT_WINDOW = 65535
MAX_FRAME = 16384


def _frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def _hpack_int(value):
    # 7-bit prefix integer, Huffman flag clear.
    if value < 127:
        return bytes([value])
    out = bytearray([127])
    value -= 127
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name, value):
    # "Literal header field without indexing, new name": the simplest valid encoding.
    return b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value)) + value


def grpc_headers(path):
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
              (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
              (b"te", b"trailers")]
    return b"".join(_literal(n, v) for n, v in fields)


class Flood:
    """One HTTP/2 connection. A reader thread drains what the server sends (acking SETTINGS and
    PING), so the server never blocks on writing to us, and counts RST_STREAM and GOAWAY."""

    def __init__(self, socket_path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.next_stream = 1
        self.resets_received = 0
        self.goaway = False
        self.closed = False
        self._lock = threading.Lock()
        # Flow control, for the one large request a connection sends (send_large).
        self._window = threading.Condition()
        self._connection_window = DEFAULT_WINDOW
        self._initial_stream_window = DEFAULT_WINDOW
        self._stream_windows = {}
        self.ended_streams = set()  # streams the server ended (trailers or RST_STREAM)
        self._send(PREFACE + _frame(SETTINGS, 0, 0))
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def _send(self, data):
        """Sends data; returns False once the server has closed the connection."""
        with self._lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def _recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_loop(self):
        try:
            while True:
                header = self._recv_exact(9)
                length = int.from_bytes(header[:3], "big")
                kind, flags = header[3], header[4]
                payload = self._recv_exact(length) if length else b""
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                if kind == SETTINGS and not flags & ACK:
                    self._settings(payload)
                    self._send(_frame(SETTINGS, ACK, 0))
                elif kind == WINDOW_UPDATE:
                    self._window_update(stream, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
                elif kind == HEADERS and flags & END_STREAM:
                    self._ended(stream)
                elif kind == PING and not flags & ACK:
                    self._send(_frame(PING, ACK, 0, payload))
                elif kind == RST_STREAM:
                    self.resets_received += 1
                    self._ended(stream)
                elif kind == GOAWAY:
                    self.goaway = True
        except (EOFError, OSError):
            pass
        with self._window:
            self.closed = True
            self._window.notify_all()

    def _settings(self, payload):
        with self._window:
            for at in range(0, len(payload) - 5, 6):
                key = int.from_bytes(payload[at:at + 2], "big")
                if key == INITIAL_WINDOW_SIZE:
                    value = int.from_bytes(payload[at + 2:at + 6], "big")
                    delta = value - self._initial_stream_window
                    self._initial_stream_window = value
                    for stream in self._stream_windows:
                        self._stream_windows[stream] += delta
            self._window.notify_all()

    def _window_update(self, stream, increment):
        with self._window:
            if stream == 0:
                self._connection_window += increment
            elif stream in self._stream_windows:
                self._stream_windows[stream] += increment
            self._window.notify_all()

    def _ended(self, stream):
        with self._window:
            self.ended_streams.add(stream)
            self._window.notify_all()

    def _new_stream(self):
        stream = self.next_stream
        self.next_stream += 2
        return stream

    def open_idle(self, count, path="/forkd.v1.Forkd/GetInfo", batch=100):
        """Opens count streams whose request never comes (HEADERS without END_STREAM)."""
        block = grpc_headers(path)
        for start in range(0, count, batch):
            data = b"".join(_frame(HEADERS, END_HEADERS, self._new_stream(), block)
                            for _ in range(min(batch, count - start)))
            if not self._send(data):
                return

    def rapid_reset(self, count, path="/forkd.v1.Forkd/GetInfo", batch=100):
        """Sends count HEADERS+RST_STREAM pairs."""
        block = grpc_headers(path)
        for start in range(0, count, batch):
            data = bytearray()
            for _ in range(min(batch, count - start)):
                stream = self._new_stream()
                data += _frame(HEADERS, END_HEADERS, stream, block)
                data += _frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
            if not self._send(bytes(data)):
                return

    def send_large(self, declared, path="/forkd.v1.Forkd/GetInfo", stall_timeout=30):
        """Starts one request whose gRPC message prefix declares `declared` bytes, then sends
        message bytes as fast as the server's flow-control windows allow, until all are sent,
        the server ends the stream, or it grants no window for stall_timeout seconds. Returns
        (bytes of the message sent, whether the server ended the stream or the connection)."""
        stream = self._new_stream()
        with self._window:
            self._stream_windows[stream] = self._initial_stream_window
        data = bytearray(struct.pack(">BI", 0, declared))
        total = len(data) + declared
        if not self._send(_frame(HEADERS, END_HEADERS, stream, grpc_headers(path))):
            return 0, False
        sent = 0
        while sent < total:
            with self._window:
                granted = self._window.wait_for(
                    lambda: stream in self.ended_streams or self.closed or min(
                        self._connection_window, self._stream_windows[stream]) > 0,
                    timeout=stall_timeout)
                if not granted or stream in self.ended_streams or self.closed:
                    break
                size = min(MAX_FRAME, total - sent, self._connection_window,
                           self._stream_windows[stream])
                self._connection_window -= size
                self._stream_windows[stream] -= size
            if len(data) < size:
                data += bytes(MAX_FRAME)
            flags = END_STREAM if sent + size == total else 0
            if not self._send(_frame(DATA, flags, stream, bytes(data[:size]))):
                break
            del data[:size]
            sent += size
        with self._window:
            ended = self._window.wait_for(lambda: stream in self.ended_streams or self.closed,
                                          timeout=stall_timeout)
        return max(0, sent - 5), ended

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)


def main(argv):
    kind, path, count = argv[1], argv[2], int(argv[3])
    flood = Flood(path)
    if kind == "idle":
        flood.open_idle(count)
        time.sleep(float(argv[4]) if len(argv) > 4 else 5)
    else:
        flood.rapid_reset(count)
        time.sleep(1)
    print("resets received %d goaway %s" % (flood.resets_received, flood.goaway))
    flood.close()


if __name__ == "__main__":
    main(sys.argv)
