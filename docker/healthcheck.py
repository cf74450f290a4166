"""Container healthcheck without curl; every target must answer.

    healthcheck.py https://HOST:PORT/PATH CA.pem   GET over TLS, verified against CA.pem, must be 200
    healthcheck.py HOST:PORT [HOST:PORT ...]       each port accepts TCP connections
"""

import socket
import ssl
import sys
import urllib.request

try:
    if sys.argv[1].startswith("https://"):
        context = ssl.create_default_context(cafile=sys.argv[2])
        with urllib.request.urlopen(sys.argv[1], context=context, timeout=5) as response:
            if response.status != 200:
                sys.exit(f"{sys.argv[1]}: HTTP {response.status}")
    else:
        for target in sys.argv[1:]:
            host, port = target.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=3).close()
except OSError as err:
    sys.exit(f"{err}")
