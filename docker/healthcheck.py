"""Container healthcheck without curl.

    healthcheck.py https://HOST:PORT/PATH CA.pem   GET over TLS, verified against CA.pem, must be 200
    healthcheck.py HOST:PORT                       the port accepts TCP connections
"""

import socket
import ssl
import sys
import urllib.request

target = sys.argv[1]
try:
    if target.startswith("https://"):
        context = ssl.create_default_context(cafile=sys.argv[2])
        with urllib.request.urlopen(target, context=context, timeout=5) as response:
            if response.status != 200:
                sys.exit(f"{target}: HTTP {response.status}")
    else:
        host, port = target.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=3).close()
except OSError as err:
    sys.exit(f"{target}: {err}")
