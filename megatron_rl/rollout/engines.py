"""The configured rollout engines: one `Engine` (client + process + routing state) per rollout.engines entry."""

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.config.sections import RolloutConfig
from megatron_rl.rollout.launcher import EngineStartError, ServerProcess, cpu_server_command
from megatron_rl.rollout.protocol import EngineClient
from megatron_rl.rollout.sglang import sglang_server_command


@dataclass(eq=False)
class Engine:
    """One engine: its client, its process when the fleet launched it, and its routing state."""

    client: EngineClient
    process: ServerProcess | None = None
    startup_timeout: float = 300.0
    ready: bool = True
    in_flight: int = 0
    failures: int = 0
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return self.client.url


def launch_engines(rollout: RolloutConfig, model_path: str, log_dir: str | Path, token: str) -> list[Engine]:
    """An Engine per rollout.engines entry: launched (and waited for, all at once) when `launch` is true,
    attached to the running server at host:port otherwise."""
    engines = []
    for index, spec in enumerate(rollout.engines):
        client = EngineClient(f"http://{spec.host}:{spec.port}", token=token, timeout=rollout.request_timeout)
        process = None
        if spec.launch:
            if listening(spec.host, spec.port):
                raise EngineStartError(f"rollout.engines[{index}]: something already listens on "
                                       f"{spec.host}:{spec.port} (a server left from another run?); stop it, choose "
                                       "another port, or set launch: false to use it as the engine")
            command = (cpu_server_command(spec, model_path) if spec.kind == "cpu"
                       else sglang_server_command(spec, model_path, token))
            process = ServerProcess(command, token, Path(log_dir) / f"engine{index}.log",
                                    watches_parent=spec.kind == "cpu")
            process.start()
        engines.append(Engine(client, process, startup_timeout=rollout.startup_timeout))
    for engine in engines:
        if engine.process is not None:
            engine.process.wait_until_ready(engine.client, engine.startup_timeout)
        elif not engine.client.health_generate():
            raise EngineStartError(f"engine {engine.url} (launch: false) does not answer /health_generate")
    return engines


def stop_engines(engines: list[Engine]) -> None:
    """Stop every engine process that was launched."""
    for engine in engines:
        if engine.process is not None:
            engine.process.stop()


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0
