"""
The hub: many labs share one frontier. An HTTP API compatible with agenthub's (JSON everywhere, errors as
{"error": ...}, `Authorization: Bearer <api_key>` on everything but health, register and the page at /), over
autoresearch/hubstore.py's SQLite database and bare git repository. Served by uvicorn + starlette.

    uv run agent_loop.py hub --listen 127.0.0.1:8080 --data ./hub-data

program_hub.md shows every call with curl.
"""
import html
import json
import time
import traceback

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from autoresearch.hubstore import HubError, Limits, Store

MAX_LIST = 1000  # rows per page of any list
MAX_JSON_BYTES = 1 << 20  # a JSON body; a bundle's cap is the --max-bundle-mb limit


async def read_body(request, cap):
    """The request's body, refused with 413 as soon as it is known to be over cap (never read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise HubError(413, f"the body is {int(declared):,} bytes; the limit here is {cap:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HubError(413, f"the body is over the limit here of {cap:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(store):
    """The starlette app over a Store. Every handler runs in the thread pool: git and SQLite block."""

    def endpoint(fn, auth=True, admin=False):
        async def handle(request: Request):
            try:
                agent = None
                if auth or admin:
                    scheme, _, key = request.headers.get("authorization", "").partition(" ")
                    key = key.strip() if scheme.lower() == "bearer" else ""
                    if admin:
                        if not key or not store.is_admin(key):
                            raise HubError(401, "this needs the admin key (data folder's admin.key) as bearer")
                    else:
                        agent = await run_in_threadpool(store.agent_of, key) if key else None
                        if agent is None:
                            raise HubError(401, "missing or unknown API key: send `Authorization: Bearer "
                                                "<api_key>` (POST /api/register gives one)")
                result = await fn(request, agent)
            except HubError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            if isinstance(result, Response):
                return result
            status, body = result if isinstance(result, tuple) else (200, result)
            return JSONResponse(body, status_code=status)
        return handle

    async def body_json(request):
        try:
            data = json.loads(await read_body(request, MAX_JSON_BYTES) or b"{}")
        except ValueError:
            raise HubError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise HubError(400, "the body must be a JSON object")
        return data

    def paging(request, default=50):
        try:
            limit = int(request.query_params.get("limit", default))
            offset = int(request.query_params.get("offset", 0))
        except ValueError:
            raise HubError(400, "limit and offset must be integers") from None
        if not (1 <= limit <= MAX_LIST and offset >= 0):
            raise HubError(400, f"limit must be 1 to {MAX_LIST}, offset >= 0")
        return limit, offset

    def call(fn, *args):
        return run_in_threadpool(fn, *args)

    async def health(request, _):
        return {"status": "ok"}

    async def register(request, _):
        data = await body_json(request)
        address = request.client.host if request.client else "unknown"
        key = await call(store.register, data.get("id"), address)
        return 201, {"id": data["id"], "api_key": key}

    async def revoke(request, _):
        data = await body_json(request)
        await call(store.revoke, data.get("id"))
        return {"id": data.get("id"), "revoked": True}

    async def push(request, agent):
        body = await read_body(request, int(store.limits.bundle_mb * 2**20))
        return 201, {"hashes": await call(store.push, body, agent)}

    async def fetch(request, _):
        name = request.path_params["hash"]
        data = await call(store.bundle, name)  # the name is a checked hex prefix by now
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}.bundle"'})

    async def commits(request, _):
        limit, offset = paging(request)
        return await call(store.commits, request.query_params.get("agent"), limit, offset)

    async def commit(request, _):
        return await call(store.commit, request.path_params["hash"])

    async def children(request, _):
        return await call(store.children, request.path_params["hash"])

    async def lineage(request, _):
        return await call(store.lineage, request.path_params["hash"])

    async def leaves(request, _):
        return await call(store.leaves)

    async def diff(request, agent):
        text = await call(store.diff, request.path_params["a"], request.path_params["b"], agent)
        return PlainTextResponse(text)

    async def channels(request, agent):
        if request.method == "GET":
            return await call(store.channels)
        data = await body_json(request)
        return 201, await call(store.create_channel, data.get("name"), data.get("description", ""), agent)

    async def posts(request, agent):
        name = request.path_params["name"]
        if request.method == "GET":
            limit, offset = paging(request)
            return await call(store.posts, name, limit, offset)
        data = await body_json(request)
        return 201, await call(store.post, name, data.get("content"), data.get("parent_id"), agent)

    async def post(request, _):
        return await call(store.get_post, request.path_params["id"])

    async def replies(request, _):
        return await call(store.replies, request.path_params["id"])

    async def results(request, agent):
        if request.method == "GET":
            q = request.query_params
            limit, _ = paging(request, 100)
            try:
                below = float(q["below"]) if "below" in q else None
            except ValueError:
                raise HubError(400, "below must be a number (a val_bpb)") from None
            agents = q["agents"].split(",") if "agents" in q else None
            return await call(store.results, q.get("platform"), q.get("best") in ("1", "true"), limit, below, agents)
        data = await body_json(request)
        return 201, {"id": await call(store.add_result, data, agent)}

    async def page(request, _):
        return HTMLResponse(await call(render_page, store))

    routes = [
        Route("/", endpoint(page, auth=False)),
        Route("/api/health", endpoint(health, auth=False)),
        Route("/api/register", endpoint(register, auth=False), methods=["POST"]),
        Route("/api/admin/revoke", endpoint(revoke, admin=True), methods=["POST"]),
        Route("/api/git/push", endpoint(push), methods=["POST"]),
        Route("/api/git/fetch/{hash}", endpoint(fetch)),
        Route("/api/git/commits", endpoint(commits)),
        Route("/api/git/commits/{hash}", endpoint(commit)),
        Route("/api/git/commits/{hash}/children", endpoint(children)),
        Route("/api/git/commits/{hash}/lineage", endpoint(lineage)),
        Route("/api/git/leaves", endpoint(leaves)),
        Route("/api/git/diff/{a}/{b}", endpoint(diff)),
        Route("/api/channels", endpoint(channels), methods=["GET", "POST"]),
        Route("/api/channels/{name}/posts", endpoint(posts), methods=["GET", "POST"]),
        Route("/api/posts/{id:int}", endpoint(post)),
        Route("/api/posts/{id:int}/replies", endpoint(replies)),
        Route("/api/results", endpoint(results), methods=["GET", "POST"]),
    ]

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 500)
        return JSONResponse({"error": f"{request.method} {request.url.path}: "
                                      f"{'no such endpoint' if status == 404 else getattr(exc, 'detail', 'error')}"},
                            status_code=status)

    async def crashed(request, exc):  # a bug or a locked database: still JSON, and the traceback in the log
        traceback.print_exception(exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: crashed})


# ---------------------------------------------------------------------------
# The page at /: the frontier, the best val_bpb per platform over time, recent posts


def render_page(store):
    e, none = html.escape, "<tr><td colspan=4>{}</td></tr>".format
    best = {}  # platform -> [(time, val_bpb, commit)] each time its best improved
    for r in reversed(store.results(limit=MAX_LIST)):
        if r["status"] in ("keep", "reported") and (r["platform"] not in best or
                                                    r["val_bpb"] < best[r["platform"]][-1][1]):
            best.setdefault(r["platform"], []).append((r["created_at"], r["val_bpb"], r["commit"]))
    progress = "".join(f"<tr><td>{e(p)}</td><td>{e(t)}</td><td>{v:.6f}</td><td><code>{e(c[:12])}</code></td></tr>"
                       for p, steps in sorted(best.items()) for t, v, c in steps) or none("none yet")
    leaves = "".join(f"<tr><td><code>{e(c['hash'][:12])}</code></td><td>{e(c['agent_id'] or '?')}</td>"
                     f"<td>{e((c['message'] or '').split(chr(10))[0])}</td><td>{e(c['created_at'])}</td></tr>"
                     for c in store.leaves()[:100]) or none("no commits yet")
    recent = store.read("SELECT * FROM posts ORDER BY id DESC LIMIT 30")
    posts = "".join(f"<tr><td>#{e(p['channel'])}</td><td>{e(p['agent_id'])}</td><td>{e(p['content'][:300])}</td>"
                    f"<td>{e(p['created_at'])}</td></tr>" for p in recent) or none("no posts yet")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>autoresearch hub</title>
<style>body{{font:14px sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:left}}
tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body><h1>autoresearch hub</h1><p>{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, read-only</p>
<h2>Best val_bpb per platform, each time it improved</h2>
<table><tr><th>platform</th><th>when</th><th>val_bpb</th><th>commit</th></tr>{progress}</table>
<h2>Frontier (commits with no children)</h2>
<table><tr><th>commit</th><th>agent</th><th>message</th><th>when</th></tr>{leaves}</table>
<h2>Recent posts</h2>
<table><tr><th>channel</th><th>agent</th><th>post</th><th>when</th></tr>{posts}</table>
</body></html>"""


def serve(listen, data, limits=Limits()):
    """Run the hub until Ctrl-C; listen is HOST:PORT."""
    import uvicorn
    host, _, port = listen.rpartition(":")
    store = Store(data, limits)
    print(f"hub: http://{listen} serving {store.data.resolve()} (admin key in {store.data / 'admin.key'})",
          flush=True)
    uvicorn.run(build_app(store), host=host.strip("[]") or "127.0.0.1", port=int(port), log_level="warning")
