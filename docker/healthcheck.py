#!/usr/bin/env python3
"""Container health check: GET a Flower process's /health and exit 0 only on HTTP 200.

    fedfreeze-healthcheck URL [CA_FILE]

For the coordinator, URL is its own HTTPS endpoint and CA_FILE the federation's CA: the
certificate chain is verified, the host name is not (the check dials 127.0.0.1, which a
certificate made for the coordinator's public name need not list). Standard library only.
"""

import ssl
import sys
import urllib.request


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    url = argv[0]
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=argv[1] if len(argv) > 1 else None)
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            ok = response.status == 200
    except OSError as err:  # URLError, connection refused, TLS failure, timeout
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
