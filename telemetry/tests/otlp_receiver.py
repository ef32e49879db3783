"""A small OTLP/HTTP receiver (protobuf bodies, decoded with the `opentelemetry-proto` package):
every span (POST /v1/traces) and every metric data point (POST /v1/metrics) it gets is written
as one JSON line to OUT (`"type": "span"` or `"type": "metric"`).

usage: otlp_receiver.py PORT OUT.jsonl       (prints "listening" once it accepts requests)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

port, out_path = int(sys.argv[1]), sys.argv[2]
out = open(out_path, "a", buffering=1)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        handlers = {"/v1/traces": self.traces, "/v1/metrics": self.metrics}
        if self.path not in handlers or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(404 if self.path not in handlers else 415)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        answer = handlers[self.path](body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def traces(self, body):
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.write(json.dumps({
                        "type": "span",
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: a.value.string_value or a.value.int_value for a in s.attributes},
                        "resource": resource,
                        "scope": ss.scope.name,
                    }) + "\n")
        return ExportTraceServiceResponse().SerializeToString()

    def metrics(self, body):
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        for rm in req.resource_metrics:
            resource = {a.key: a.value.string_value for a in rm.resource.attributes}
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                        out.write(json.dumps({
                            "type": "metric",
                            "name": m.name,
                            "kind": kind,
                            "value": value,
                            "attributes": {a.key: a.value.string_value for a in p.attributes},
                            "resource": resource,
                        }) + "\n")
        return ExportMetricsServiceResponse().SerializeToString()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("listening", flush=True)
server.serve_forever()
