import httpx

from tests.support import auth, wait_ready


def test_api_and_worker_processes_serve_a_write_and_read(redis_server, spawn):
    api = spawn("api", redis_server.url)
    spawn("worker", redis_server.url)
    wait_ready(api.url)  # the worker is up: the read below is the projector's, not the API's own catch-up
    with httpx.Client(base_url=api.url) as c:
        created = c.post("/sessions", json={"situation": "s"}, headers=auth())
        assert created.status_code == 201
        sid = created.json()["id"]
        got = c.get(f"/sessions/{sid}", headers=auth())
        assert got.status_code == 200 and got.json() == created.json()
        assert c.get("/ready").json()["status"] == "ready"
