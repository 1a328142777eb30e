"""Sans-I/O HTTP/1.1: message heads, the llhttp parser adapter, body framing, forwarding rules."""
