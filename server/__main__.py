"""``chorus-server``: run the server until SIGINT/SIGTERM, then shut down gracefully (exit code 0)."""
from __future__ import annotations

import logging
import signal
import sys

import trio

from ._app import serve
from ._config import config_from_args


async def _run(config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, config)
            ws = f", chat page on http://{config.host}:{server.ws_port}/" if server.ws_port else ""
            print(f"Chorus listening on {config.host}:{server.port}{ws} (data in {config.db_path})", flush=True)
            async for signum in signals:
                logging.getLogger("chorus.server").info("%s received", signal.Signals(signum).name)
                server.shutdown()
                break


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(_run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
