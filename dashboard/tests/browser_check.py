"""Open the dashboard in headless Chromium, driven over the W3C WebDriver protocol by
chromedriver (Debian's `chromium` and `chromium-driver`; plain HTTP from here, no client
library), and report what the page shows: the robots, a live value read twice, the camera
picture's size. Saves a screenshot.

usage: browser_check.py URL SCREENSHOT.png ROBOT [TOKEN [WATCH_S]]
(with TOKEN, it types the token into the page's login form, as a person does; with WATCH_S, it
reads the fleet's autonomous success headline every second for that long and reports each
reading, `success_readings`, and takes the screenshot at the end)
prints {"robots": [...], "obs_before": N, "obs_after": M, "camera_width": W, ...}; exits 1 on failure
"""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

url, shot, robot = sys.argv[1], sys.argv[2], sys.argv[3]
token = sys.argv[4] if len(sys.argv) > 4 else None
watch_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


port = free_port()
driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["value"]


def until(what, fn, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


try:
    def ready():
        try:
            return call("GET", "/status")["ready"]
        except OSError:
            return False
    until("chromedriver to start", ready)
    caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1100"],
    }}}}
    session = call("POST", "/session", caps)["sessionId"]
    s = f"/session/{session}"
    call("POST", s + "/url", {"url": url})
    js = lambda script: call("POST", s + "/execute/sync", {"script": script, "args": []})
    if token is not None:
        until("the login form", lambda: js("return !document.getElementById('login').hidden;"))
        js(f"document.getElementById('token').value = {json.dumps(token)}; "
           "document.getElementById('login-go').click(); return true;")
    count = f"const e = document.querySelector('#robot-{robot} .obs-count'); return e ? Number(e.textContent) : 0;"
    before = until("the robot's card with observations", lambda: js(count))
    width = until("the camera picture", lambda: js(
        f"const i = document.querySelector('#robot-{robot} img.camera'); return i && i.complete ? i.naturalWidth : 0;"))
    after = until("a live update of the observation count", lambda: (lambda v: v if v > before else 0)(js(count)), 15)
    report = {
        "robots": js("return [...document.querySelectorAll('.robot h3')].map(h => h.firstChild.textContent.trim());"),
        "obs_before": before,
        "obs_after": after,
        "camera_width": width,
        "updates": js("return Number(document.getElementById('updates').textContent);"),
        "live": js("return document.getElementById('live').classList.contains('live');"),
        "topic_rows": js("return document.querySelectorAll('#topics tbody tr').length;"),
        "node_rows": js("return document.querySelectorAll('#nodes tbody tr').length;"),
        "errors": js("return window.__errors || [];"),
    }
    readings = []
    deadline = time.time() + watch_s
    while time.time() < deadline:
        readings.append(js("return document.getElementById('fleet-success').textContent;"))
        time.sleep(1.0)
    report["success_readings"] = readings
    report["errors"] = js("return window.__errors || [];")
    # SCROLL_TO=ID in the environment: the screenshot shows that section (a person's look).
    if os.environ.get("SCROLL_TO"):
        js(f"document.getElementById({json.dumps(os.environ['SCROLL_TO'])}).scrollIntoView(); return true;")
        time.sleep(1.0)
    png = base64.b64decode(call("GET", s + "/screenshot"))
    open(shot, "wb").write(png)
    report["screenshot_bytes"] = len(png)
    call("DELETE", s)
    print(json.dumps(report))
finally:
    driver.kill()
    driver.wait()
