"""A Zenoh client of a secured NanoBot fleet, as any Python tool would be.

usage: secured_client.py ENDPOINT CA [CERT KEY]

Connects to ENDPOINT (tls/ with the fleet's authority CA, and with the certificate CERT and its
key KEY if given; or tcp/), watches `nb/**` for two seconds and asks `nb/ckpt/control/list`.
Prints one JSON line: {"session": bool, "messages": int, "replies": int, "error": str}.
"""

import json
import sys
import time

import zenoh

endpoint, ca = sys.argv[1], sys.argv[2]
tls = {"root_ca_certificate": ca, "verify_name_on_connect": False}
if len(sys.argv) > 4:
    tls.update(enable_mtls=True, connect_certificate=sys.argv[3], connect_private_key=sys.argv[4])
conf = {
    "mode": "client",
    "connect": {"endpoints": [endpoint]},
    "scouting": {"multicast": {"enabled": False}},
    "transport": {"link": {"tls": tls}},
}
try:
    session = zenoh.open(zenoh.Config.from_json5(json.dumps(conf)))
except Exception as e:  # no session: the fleet did not admit us
    print(json.dumps({"session": False, "messages": 0, "replies": 0, "error": str(e)[:200]}))
    sys.exit(0)
got = []
sub = session.declare_subscriber("nb/**", lambda sample: got.append(str(sample.key_expr)))
time.sleep(2.0)
replies = sum(1 for _ in session.get("nb/ckpt/control/list", timeout=2.0))
print(json.dumps({"session": True, "messages": len(got), "replies": replies, "error": ""}))
sub.undeclare()
session.close()
