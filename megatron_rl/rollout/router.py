"""sglang-router in front of the rollout engines, for /generate only.

    router = launch_router(cfg.rollout, engines, log_dir, token)   # an Engine whose client is the router
    fleet = Fleet(engines, max_concurrency, max_retries, resync, router=router)

The router (PyPI `sglang-router`, a Rust load balancer: `pip install 'megatron-rl[router]'`) is given
the engines' URLs and spreads /generate requests over them by rollout.router.policy; it passes the
client's Authorization header on to the engine. Weight updates, health checks and restarts never go
through it (sglang-router 0.3.2 answers 404 for the weight-update routes): WeightSync and the Fleet talk
to each engine directly. It binds rollout.router.host, loopback unless the config says otherwise, and
its Prometheus exporter (always on in 0.3.2) binds 127.0.0.1:rollout.router.metrics_port.
"""

import importlib.util
import math
import sys
from pathlib import Path

from megatron_rl.config.sections import RolloutConfig, RouterConfig
from megatron_rl.rollout.engines import Engine, listening
from megatron_rl.rollout.launcher import EngineStartError, ServerProcess
from megatron_rl.rollout.protocol import EngineClient


def router_command(config: RouterConfig, worker_urls: list[str], request_timeout: float) -> list[str]:
    return [sys.executable, "-m", "sglang_router.launch_router", "--host", config.host, "--port", str(config.port),
            "--worker-urls", *worker_urls, "--policy", config.policy, "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(config.metrics_port), "--request-timeout-secs", str(math.ceil(request_timeout)),
            "--health-check-interval-secs", str(config.health_check_interval), "--log-level", "warn"]


def launch_router(rollout: RolloutConfig, engines: list[Engine], log_dir: str | Path, token: str) -> Engine:
    """The router as an Engine: launched and waited for (it answers /health_generate once it has registered
    the engines) when rollout.router.launch is true, attached to the running one otherwise."""
    config = rollout.router
    client = EngineClient(f"http://{config.host}:{config.port}", token=token, timeout=rollout.request_timeout)
    if not config.launch:
        if not client.health_generate():
            raise EngineStartError(f"rollout.router (launch: false): {client.url} does not answer /health_generate")
        return Engine(client, startup_timeout=rollout.startup_timeout)
    if importlib.util.find_spec("sglang_router") is None:
        raise EngineStartError("rollout.router.enabled: the sglang-router package is not installed in this "
                               f"environment ({sys.executable}); pip install 'megatron-rl[router]'")
    for name, port in (("port", config.port), ("metrics_port", config.metrics_port)):
        if listening("127.0.0.1" if name == "metrics_port" else config.host, port):
            raise EngineStartError(f"rollout.router.{name}: something already listens on port {port} (a router left "
                                   "from another run?); stop it or choose another port")
    process = ServerProcess(router_command(config, [engine.url for engine in engines], rollout.request_timeout),
                            token, Path(log_dir) / "router.log")
    process.start()
    process.wait_until_ready(client, rollout.startup_timeout)
    return Engine(client, process, startup_timeout=rollout.startup_timeout)
