#!/usr/bin/env python3
"""Runs the README's grpcurl examples against a live datastorage server.

grpcurl is not installable everywhere the tests run, so this is a stand-in that,
like grpcurl, knows nothing about the API ahead of time: it has no .proto files
and no generated stubs and learns every type through gRPC server reflection.

  python tests/grpcurl_examples.py --addr 127.0.0.1:PORT --readme README.md

1. Self-check of the contract over BOTH reflection protocols
   (grpc.reflection.v1.ServerReflection and grpc.reflection.v1alpha.ServerReflection):
   the services are listed, every contract RPC is present, and
   datastorage.v1.WriteAuditRequest (and every datastorage service) resolves,
   with all transitive imports (google/protobuf/*, google/rpc/status.proto),
   into a fresh descriptor pool.
2. Every `grpcurl` command in the README's fenced code blocks is executed:
   `list [SERVICE]`, `describe SYMBOL` and `-d '<json>' ADDR pkg.Service/Method`
   (unary and server-streaming), with `-H 'name: value'` headers. The README's
   address (localhost:8080) is replaced by --addr. Each command and its output
   is printed; the exit status is non-zero on the first failure.

grpcio-reflection only ships v1alpha stubs. The v1 protocol has the same
messages with the same field numbers under another package, so the v1 client
sends the v1alpha messages to /grpc.reflection.v1.ServerReflection/ServerReflectionInfo.

`--dry-run` only parses the README and prints the commands (no server needed).
"""

import argparse
import json
import os
import re
import shlex
import sys

CONTRACT_SERVICES = {
    "datastorage.v1.AuditWrite": [
        "WriteAudit", "BatchWriteAudit", "PlaceLegalHold", "ReleaseLegalHold",
    ],
    "datastorage.v1.IncidentQuery": [
        "ListIncidents", "GetIncident", "ListAuditEvents", "GetActionStats",
        "VerifyAuditChain", "ListLegalHolds", "ExportAuditEvents",
    ],
    "datastorage.v1.VectorSearch": ["SearchSimilar"],
    "datastorage.v1.JobStatus": ["StartJob", "GetJob", "ListJobs", "CancelJob", "WatchJob"],
    "grpc.health.v1.Health": ["Check"],
}
REQUIRED_IMPORTS = [
    "google/protobuf/timestamp.proto",
    "google/protobuf/struct.proto",
    "google/protobuf/duration.proto",
    "google/rpc/status.proto",
]
REFLECTION_SERVICES = {
    "v1": "grpc.reflection.v1.ServerReflection",
    "v1alpha": "grpc.reflection.v1alpha.ServerReflection",
}


class Failure(Exception):
    """A check or command failed; the message says which and why."""


class NotFound(Failure):
    """The reflection service answered with an error_response."""


# --------------------------------------------------------------------------
# README parsing (no gRPC imports needed: testable on its own)
# --------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)")


def fenced_blocks(text):
    """Yields (first_line_number, [lines]) for each fenced code block."""
    block, start, fence = None, 0, None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if block is None:
            if m:
                block, start, fence = [], number + 1, m.group(1)
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and line.strip() == m.group(1):
            yield start, block
            block = None
        else:
            block.append(line)
    if block is not None:
        raise Failure(f"README: code block starting at line {start - 1} is never closed")


def _strip_prompt(line):
    s = line.strip()
    for prompt in ("$ ", "% ", "> "):
        if s.startswith(prompt):
            return s[len(prompt):].lstrip()
    return s


def extract_commands(text):
    """Returns [(line_number, argv)] for every grpcurl command in fenced blocks.

    A command may continue over several lines with a trailing backslash or
    with a quoted argument (e.g. a multi-line -d '{...}') that spans lines."""
    commands = []
    for start, lines in fenced_blocks(text):
        i = 0
        while i < len(lines):
            first = _strip_prompt(lines[i])
            if not re.match(r"grpcurl(\s|$)", first):
                i += 1
                continue
            line_number = start + i
            buf = first
            while True:
                joined = re.sub(r"\\\n", " ", buf)
                complete = not joined.rstrip().endswith("\\")
                if complete:
                    try:
                        argv = shlex.split(joined, comments=True)
                        break
                    except ValueError:  # an open quote: the command goes on
                        pass
                i += 1
                if i >= len(lines):
                    raise Failure(f"README line {line_number}: unterminated grpcurl command")
                buf += "\n" + lines[i]
            if "|" in argv or ">" in argv or ";" in argv or "&&" in argv:
                raise Failure(f"README line {line_number}: pipes/redirections/chains are not "
                              f"supported in grpcurl examples: {joined.strip()}")
            commands.append((line_number, argv))
            i += 1
    return commands


VALUE_FLAGS = {"d", "H", "rpc-header", "reflect-header", "max-time", "connect-timeout", "format"}
BOOL_FLAGS = {"plaintext", "emit-defaults", "v"}


def parse_grpcurl(argv):
    """Parses a grpcurl argv into a dict: flags, address, verb, symbol."""
    if not argv or argv[0] != "grpcurl":
        raise Failure(f"not a grpcurl command: {argv}")
    opts = {"plaintext": False, "d": None, "headers": [], "rpc_headers": [],
            "reflect_headers": [], "emit_defaults": False, "max_time": None,
            "format": "json"}
    args = argv[1:]
    positional = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not positional:
            name = a.lstrip("-")
            value = None
            if "=" in name:
                name, value = name.split("=", 1)
            if name in BOOL_FLAGS:
                if value is not None and value not in ("true", "false"):
                    raise Failure(f"bad value for -{name}: {value}")
                flag_on = value != "false"
                if name == "plaintext":
                    opts["plaintext"] = flag_on
                elif name == "emit-defaults":
                    opts["emit_defaults"] = flag_on
            elif name in VALUE_FLAGS:
                if value is None:
                    i += 1
                    if i >= len(args):
                        raise Failure(f"-{name} needs a value")
                    value = args[i]
                if name == "d":
                    opts["d"] = value
                elif name == "H":
                    opts["headers"].append(value)
                elif name == "rpc-header":
                    opts["rpc_headers"].append(value)
                elif name == "reflect-header":
                    opts["reflect_headers"].append(value)
                elif name == "max-time":
                    opts["max_time"] = float(value)
                elif name == "format":
                    if value != "json":
                        raise Failure(f"only -format json is supported, not {value}")
            else:
                raise Failure(f"unsupported grpcurl flag: {a}")
        else:
            positional.append(a)
        i += 1
    if not positional:
        raise Failure("grpcurl: no address given")
    address, rest = positional[0], positional[1:]
    if rest and rest[0] in ("list", "describe"):
        if len(rest) > 2:
            raise Failure(f"too many arguments for {rest[0]}: {rest[1:]}")
        verb, symbol = rest[0], (rest[1] if len(rest) == 2 else None)
        if verb == "describe" and symbol is None:
            raise Failure("describe without a symbol is not supported")
        if opts["d"] is not None:
            raise Failure(f"-d makes no sense with {verb}")
    elif len(rest) == 1:
        verb, symbol = "invoke", rest[0]
    else:
        raise Failure(f"cannot understand grpcurl arguments: {rest}")
    if not opts["plaintext"]:
        raise Failure("only -plaintext examples are supported (the dev server has no TLS)")
    return {"opts": opts, "address": address, "verb": verb, "symbol": symbol}


def parse_headers(values):
    out = []
    for h in values:
        if ":" not in h:
            raise Failure(f"bad header {h!r}: expected 'name: value'")
        k, v = h.split(":", 1)
        out.append((k.strip().lower(), v.strip()))
    return out


# --------------------------------------------------------------------------
# Reflection client
# --------------------------------------------------------------------------

class Reflection:
    """Resolves symbols over one reflection protocol into a private pool."""

    def __init__(self, channel, version, metadata=(), timeout=30.0):
        # Imported here, not at the top, so that --dry-run needs no grpc.
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha import reflection_pb2

        self.version = version
        self.service = REFLECTION_SERVICES[version]
        self._pb = reflection_pb2
        self._call = channel.stream_stream(
            f"/{self.service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        self.metadata = tuple(metadata)
        self.timeout = timeout
        self.pool = descriptor_pool.DescriptorPool()  # fresh: nothing preloaded
        self.protos = {}     # file name -> FileDescriptorProto, as received
        self.loaded = set()  # file names added to the pool

    def _ask(self, **kwargs):
        import grpc
        request = self._pb.ServerReflectionRequest(**kwargs)
        try:
            responses = list(self._call(iter([request]), metadata=self.metadata,
                                        timeout=self.timeout))
        except grpc.RpcError as e:
            raise Failure(f"reflection {self.version} ({self.service}) failed: "
                          f"{e.code().name}: {e.details()}") from None
        if len(responses) != 1:
            raise Failure(f"reflection {self.version}: expected 1 response, got {len(responses)}")
        response = responses[0]
        if response.HasField("error_response"):
            err = response.error_response
            raise NotFound(f"reflection {self.version}: {kwargs}: "
                              f"error {err.error_code}: {err.error_message}")
        return response

    def list_services(self):
        response = self._ask(list_services="")
        return sorted(s.name for s in response.list_services_response.service)

    def _store(self, response):
        from google.protobuf import descriptor_pb2
        names = []
        for raw in response.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            self.protos.setdefault(fd.name, fd)
            names.append(fd.name)
        if not names:
            raise Failure(f"reflection {self.version}: empty file_descriptor_response")
        return names

    def _load_file(self, name, stack=()):
        if name in self.loaded:
            return
        if name in stack:
            raise Failure(f"import cycle through {name}")
        if name not in self.protos:
            try:
                self._store(self._ask(file_by_filename=name))
            except NotFound as e:
                raise Failure(f"{e} (the server must serve every imported file, "
                              f"including google/protobuf and google/rpc ones)") from None
            if name not in self.protos:
                raise Failure(f"reflection {self.version}: asked for {name}, got other files")
        fd = self.protos[name]
        for dep in fd.dependency:
            self._load_file(dep, stack + (name,))
        self.pool.Add(fd)
        self.loaded.add(name)

    def resolve(self, symbol):
        """Loads the file defining `symbol` (and its imports); returns its descriptor."""
        candidates = [symbol]
        if "." in symbol:  # a method (pkg.Service.Method) or a field or enum value
            candidates.append(symbol.rsplit(".", 1)[0])
        last_error = None
        for candidate in candidates:
            try:
                names = self._store(self._ask(file_containing_symbol=candidate))
            except NotFound as e:
                last_error = e
                continue
            for name in names:
                self._load_file(name)
            found = self.find(symbol)
            if found is not None:
                return found
        raise Failure(f"symbol {symbol!r} not found over reflection {self.version}"
                      + (f": {last_error}" if last_error else ""))

    def find(self, symbol):
        for finder in (self.pool.FindServiceByName, self.pool.FindMessageTypeByName,
                       self.pool.FindEnumTypeByName, self.pool.FindMethodByName,
                       self.pool.FindFieldByName, self.pool.FindOneofByName):
            try:
                return finder(symbol)
            except KeyError:
                continue
        return None


# --------------------------------------------------------------------------
# describe: proto source from descriptors, in grpcurl's layout
# --------------------------------------------------------------------------

SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
    7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32",
    15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64",
}
TYPE_GROUP, TYPE_MESSAGE, TYPE_ENUM = 10, 11, 14
LABEL_REPEATED = 3


def _field_type(field):
    if field.type in (TYPE_MESSAGE, TYPE_ENUM, TYPE_GROUP):
        return field.type_name
    return SCALARS[field.type]


def _render_message(proto, indent, syntax):
    pad = "  " * indent
    out = [f"{pad}message {proto.name} {{"]
    maps = {}
    for nested in proto.nested_type:
        if nested.options.map_entry:
            maps[nested.name] = nested
    for nested in proto.nested_type:
        if not nested.options.map_entry:
            out.extend(_render_message(nested, indent + 1, syntax))
    for enum in proto.enum_type:
        out.extend(_render_enum(enum, indent + 1))
    real_oneofs = {}
    for field in proto.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            real_oneofs.setdefault(field.oneof_index, []).append(field)
    emitted = set()
    for field in proto.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            idx = field.oneof_index
            if idx in emitted:
                continue
            emitted.add(idx)
            out.append(f"{pad}  oneof {proto.oneof_decl[idx].name} {{")
            for f in real_oneofs[idx]:
                out.append(f"{pad}    {_field_type(f)} {f.name} = {f.number};")
            out.append(f"{pad}  }}")
            continue
        entry_name = field.type_name.rsplit(".", 1)[-1]
        if field.label == LABEL_REPEATED and field.type == TYPE_MESSAGE and entry_name in maps:
            key, value = maps[entry_name].field[0], maps[entry_name].field[1]
            out.append(f"{pad}  map<{_field_type(key)}, {_field_type(value)}> "
                       f"{field.name} = {field.number};")
            continue
        label = ""
        if field.label == LABEL_REPEATED:
            label = "repeated "
        elif field.proto3_optional:
            label = "optional "
        elif syntax == "proto2":
            label = "optional " if field.label == 1 else "required "
        out.append(f"{pad}  {label}{_field_type(field)} {field.name} = {field.number};")
    out.append(f"{pad}}}")
    return out


def _render_enum(proto, indent):
    pad = "  " * indent
    out = [f"{pad}enum {proto.name} {{"]
    for value in proto.value:
        out.append(f"{pad}  {value.name} = {value.number};")
    out.append(f"{pad}}}")
    return out


def _render_method(method):
    cs = "stream " if method.client_streaming else ""
    ss = "stream " if method.server_streaming else ""
    return (f"rpc {method.name} ( {cs}{method.input_type} ) "
            f"returns ( {ss}{method.output_type} );")


def describe(descriptor):
    from google.protobuf import descriptor as d
    from google.protobuf import descriptor_pb2 as pb

    if isinstance(descriptor, d.ServiceDescriptor):
        proto = pb.ServiceDescriptorProto()
        descriptor.CopyToProto(proto)
        lines = [f"{descriptor.full_name} is a service:", f"service {proto.name} {{"]
        lines += [f"  {_render_method(m)}" for m in proto.method]
        lines.append("}")
        return "\n".join(lines)
    if isinstance(descriptor, d.Descriptor):
        proto = pb.DescriptorProto()
        descriptor.CopyToProto(proto)
        fproto = pb.FileDescriptorProto()
        descriptor.file.CopyToProto(fproto)
        syntax = fproto.syntax or "proto2"
        return "\n".join([f"{descriptor.full_name} is a message:"]
                         + _render_message(proto, 0, syntax))
    if isinstance(descriptor, d.EnumDescriptor):
        proto = pb.EnumDescriptorProto()
        descriptor.CopyToProto(proto)
        return "\n".join([f"{descriptor.full_name} is an enum:"] + _render_enum(proto, 0))
    if isinstance(descriptor, d.MethodDescriptor):
        proto = pb.MethodDescriptorProto()
        descriptor.CopyToProto(proto)
        return f"{descriptor.full_name} is a method:\n{_render_method(proto)}"
    if isinstance(descriptor, d.FieldDescriptor):
        owner = pb.DescriptorProto()
        descriptor.containing_type.CopyToProto(owner)
        field = next(f for f in owner.field if f.name == descriptor.name)
        return f"{descriptor.full_name} is a field:\n{_field_type(field)} {field.name} = {field.number};"
    if isinstance(descriptor, d.OneofDescriptor):
        fields = "\n".join(f"  {f.name} = {f.number};" for f in descriptor.fields)
        return f"{descriptor.full_name} is a one-of:\noneof {descriptor.name} {{\n{fields}\n}}"
    return f"{descriptor.full_name}: {type(descriptor).__name__}"


# --------------------------------------------------------------------------
# Contract self-check
# --------------------------------------------------------------------------

def self_check(channel, version, metadata, timeout):
    r = Reflection(channel, version, metadata, timeout)
    services = r.list_services()
    missing = [s for s in CONTRACT_SERVICES if s not in services]
    if missing:
        raise Failure(f"reflection {version}: services missing from list: {missing} "
                      f"(listed: {services})")
    if not any(s.startswith("grpc.reflection.") for s in services):
        raise Failure(f"reflection {version}: no reflection service listed (listed: {services})")

    request = r.resolve("datastorage.v1.WriteAuditRequest")
    fields = set(request.fields_by_name)
    if not {"event", "request_id", "embedding"} <= fields:
        raise Failure(f"datastorage.v1.WriteAuditRequest lacks contract fields: "
                      f"{sorted({'event', 'request_id', 'embedding'} - fields)}")
    event = request.fields_by_name["event"].message_type
    if event is None or event.full_name != "datastorage.v1.AuditEvent":
        raise Failure("WriteAuditRequest.event is not a datastorage.v1.AuditEvent")
    payload = event.oneofs_by_name.get("payload")
    want = {"remediation", "ai_analysis", "workflow", "execution", "custom"}
    if payload is None or not want <= {f.name for f in payload.fields}:
        raise Failure("datastorage.v1.AuditEvent lacks the contract's oneof payload "
                      f"{sorted(want)}")

    for name, methods in CONTRACT_SERVICES.items():
        svc = r.resolve(name)
        absent = [m for m in methods if m not in svc.methods_by_name]
        if absent:
            raise Failure(f"reflection {version}: {name} lacks contract RPCs {absent}")
    missing = [f for f in REQUIRED_IMPORTS if f not in r.loaded]
    if missing:
        raise Failure(f"reflection {version}: imports not resolved: {missing}")
    print(f"reflection {version}: OK: {len(services)} services listed, "
          f"{len(r.loaded)} files resolved ({', '.join(sorted(r.loaded))})")
    return r


# --------------------------------------------------------------------------
# Running one grpcurl command
# --------------------------------------------------------------------------

def _json_messages(data):
    """grpcurl -d accepts a stream of JSON objects (for client streaming)."""
    if data is None:
        return ["{}"]
    decoder, pos, out = json.JSONDecoder(), 0, []
    data = data.strip()
    while pos < len(data):
        obj, end = decoder.raw_decode(data, pos)
        out.append(json.dumps(obj))
        pos = end
        while pos < len(data) and data[pos].isspace():
            pos += 1
    return out or ["{}"]


class Runner:
    def __init__(self, channel, reflection, timeout):
        self.channel = channel
        self.reflection = reflection
        self.timeout = timeout
        self.writes = {}  # request_id -> (request JSON, first response)

    def run(self, cmd):
        opts, verb, symbol = cmd["opts"], cmd["verb"], cmd["symbol"]
        headers = parse_headers(opts["headers"])
        reflect_md = tuple(headers + parse_headers(opts["reflect_headers"]))
        rpc_md = tuple(headers + parse_headers(opts["rpc_headers"]))
        r = self.reflection
        r.metadata = reflect_md
        if verb == "list":
            if symbol is None:
                return "\n".join(r.list_services())
            svc = r.resolve(symbol)
            if not hasattr(svc, "methods_by_name"):
                raise Failure(f"{symbol} is not a service")
            return "\n".join(f"{svc.full_name}.{m.name}" for m in svc.methods)
        if verb == "describe":
            return describe(r.resolve(symbol))
        return self.invoke(symbol, opts, rpc_md)

    def invoke(self, symbol, opts, metadata):
        import grpc
        from google.protobuf import json_format, message_factory

        if "/" in symbol:
            service_name, method_name = symbol.split("/", 1)
        elif symbol.count(".") >= 2:
            service_name, method_name = symbol.rsplit(".", 1)
        else:
            raise Failure(f"bad method name {symbol!r}: expected pkg.Service/Method")
        r = self.reflection
        svc = r.resolve(service_name)
        method = getattr(svc, "methods_by_name", {}).get(method_name)
        if method is None:
            raise Failure(f"service {service_name} has no method {method_name}")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        requests = []
        for text in _json_messages(opts["d"]):
            msg = req_cls()
            try:
                json_format.Parse(text, msg, descriptor_pool=r.pool)
            except json_format.ParseError as e:
                raise Failure(f"request JSON does not fit {method.input_type.full_name}: {e}") \
                    from None
            requests.append(msg)
        client_streaming = method.client_streaming
        server_streaming = method.server_streaming
        if not client_streaming and len(requests) != 1:
            raise Failure(f"{symbol} is unary: -d must hold exactly one JSON object")
        path = f"/{service_name}/{method_name}"
        ser, de = (lambda m: m.SerializeToString()), resp_cls.FromString
        timeout = opts["max_time"] or self.timeout
        try:
            if client_streaming and server_streaming:
                stub = self.channel.stream_stream(path, request_serializer=ser, response_deserializer=de)
                responses = list(stub(iter(requests), metadata=metadata, timeout=timeout))
            elif client_streaming:
                stub = self.channel.stream_unary(path, request_serializer=ser, response_deserializer=de)
                responses = [stub(iter(requests), metadata=metadata, timeout=timeout)]
            elif server_streaming:
                stub = self.channel.unary_stream(path, request_serializer=ser, response_deserializer=de)
                responses = list(stub(requests[0], metadata=metadata, timeout=timeout))
            else:
                stub = self.channel.unary_unary(path, request_serializer=ser, response_deserializer=de)
                responses = [stub(requests[0], metadata=metadata, timeout=timeout)]
        except grpc.RpcError as e:
            code = "".join(p.capitalize() for p in e.code().name.split("_"))
            raise Failure(f"ERROR:\n  Code: {code}\n  Message: {e.details()}") from None
        rendered = [json_format.MessageToJson(
            m, indent=2, descriptor_pool=r.pool,
            always_print_fields_with_no_presence=opts["emit_defaults"]) for m in responses]
        self.check_semantics(method.full_name, opts["d"], responses)
        return "\n".join(rendered)

    def check_semantics(self, method, data, responses):
        """Light checks of what the README promises about the examples."""
        if method == "datastorage.v1.AuditWrite.WriteAudit":
            response = responses[0]
            state = response.DESCRIPTOR.fields_by_name["write_state"].enum_type \
                .values_by_number.get(response.write_state)
            if not response.event_id and (state is None or state.name != "WRITE_STATE_QUEUED"):
                raise Failure("WriteAudit returned no eventId")
            body = json.loads(data or "{}")
            request_id = body.get("requestId") or body.get("request_id")
            if not request_id:
                return
            canonical = json.dumps(body, sort_keys=True)
            if request_id in self.writes:
                first_data, first = self.writes[request_id]
                if first_data == canonical:
                    if not response.duplicate:
                        raise Failure(f"retry with requestId {request_id!r} was not "
                                      f"reported as duplicate")
                    if response.event_id != first.event_id:
                        raise Failure(f"retry with requestId {request_id!r} returned event "
                                      f"{response.event_id}, the first write {first.event_id}")
            else:
                if response.duplicate:
                    print(f"note: the first write with requestId {request_id!r} in this run "
                          f"was a duplicate: the server had it from an earlier run")
                self.writes[request_id] = (canonical, response)
        elif method == "grpc.health.v1.Health.Check":
            if responses[0].status != 1:  # SERVING
                raise Failure("health check is not SERVING")


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--addr", help="host:port of the server; replaces the README's address")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC")
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--dry-run", action="store_true",
                    help="parse the README and print the commands; no server needed")
    args = ap.parse_args()

    try:
        if not os.path.isabs(args.readme) and not os.path.exists(args.readme):
            # Relative to the repository root when not found from the cwd.
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            args.readme = os.path.join(repo, args.readme)
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        commands = [(line, argv, parse_grpcurl(argv)) for line, argv in extract_commands(text)]
        if not commands:
            raise Failure(f"no grpcurl commands found in fenced code blocks of {args.readme}")
        if args.dry_run:
            for line, argv, cmd in commands:
                print(f"{args.readme}:{line}: {shlex.join(argv)}")
                print(f"  -> {cmd['verb']} {cmd['symbol'] or ''}".rstrip())
            print(f"{len(commands)} grpcurl commands")
            return 0
        if not args.addr:
            raise Failure("--addr is required (except with --dry-run)")

        import grpc
        # Never through an HTTP proxy from the environment: the server is local.
        channel = grpc.insecure_channel(args.addr, options=[("grpc.enable_http_proxy", 0)])
        try:
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        except grpc.FutureTimeoutError:
            raise Failure(f"cannot connect to {args.addr} within {args.connect_timeout}s") from None

        print(f"== reflection self-check against {args.addr}")
        reflection = None
        for version in ("v1alpha", "v1"):  # v1 last: its client runs the examples
            reflection = self_check(channel, version, (), args.timeout)

        runner = Runner(channel, reflection, args.timeout)
        for line, argv, cmd in commands:
            shown = [args.addr if a == cmd["address"] else a for a in argv]
            print(f"\n== {args.readme}:{line}")
            print(f"$ {shlex.join(shown)}")
            try:
                output = runner.run(cmd)
            except Failure as e:
                raise Failure(f"{args.readme}:{line}: `{shlex.join(shown)}` failed:\n{e}") from None
            print(output)
        print(f"\ngrpcurl examples: all {len(commands)} commands succeeded")
        return 0
    except Failure as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
