"""Container healthcheck without curl; every target must answer.

    healthcheck.py https://HOST:PORT/PATH CA.pem   GET over TLS, verified against CA.pem, must be 200
    healthcheck.py http://HOST:PORT/PATH           GET, must be 200 (e.g. through a relay: the far end answered)
    healthcheck.py HOST:PORT [HOST:PORT ...]       each port accepts TCP connections

Targets combine: `healthcheck.py http://127.0.0.1:9094/health 127.0.0.1:9200`.
"""

import socket
import ssl
import sys
import urllib.request

args = sys.argv[1:]
try:
    while args:
        target = args.pop(0)
        if target.startswith(("https://", "http://")):
            context = ssl.create_default_context(cafile=args.pop(0)) if target.startswith("https://") else None
            with urllib.request.urlopen(target, context=context, timeout=5) as response:
                if response.status != 200:
                    sys.exit(f"{target}: HTTP {response.status}")
        else:
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=3).close()
except OSError as err:
    sys.exit(f"{target}: {err}")
