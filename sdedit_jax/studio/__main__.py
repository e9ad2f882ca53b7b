"""``python -m sdedit_jax.studio``: serve the studio page on this machine and print its URL.

    python -m sdedit_jax.studio [--model <folder>] [--dataset <folder>] [--host 127.0.0.1]
                                [--port 8765] [--token <secret>]

The default model is the shipped one; a Stable Diffusion 1.x/2.x or SDXL folder adds a
prompt, negative prompt and guidance scale to the page. Every preset's program at
K = 1 (a text model's guided one) is compiled before the URL is printed, so no
preset's first request holds up the queue; other K (and a text model's unguided
rows) compile on first use. A host other than loopback is refused without ``--token``.
"""

from __future__ import annotations

import argparse
import os
import sys

from sdedit_jax.util import quiet

tf = quiet.import_tensorflow()  # before anything else imports it

from sdedit_jax import pretrained  # noqa: E402
from sdedit_jax.studio import previews, server  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdedit_jax.studio", description=__doc__)
    parser.add_argument("--model", default="default", help="model folder ('default': shipped)")
    parser.add_argument("--dataset", default=None, help="folder that 'save to dataset' writes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=None, help="required by every request when set")
    parser.add_argument("--per-device-batch", type=int, default=8, help="rows per device per call")
    parser.add_argument("--max-queue", type=int, default=64, help="queued previews before 503")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.host not in server.LOOPBACK and not args.token:
        print(f"host: {args.host!r} is not loopback; pass --token", file=sys.stderr)
        return 2
    model_dir = args.model if args.model == "default" else os.path.abspath(args.model)
    model = pretrained.load_model(None if model_dir == "default" else model_dir)
    previewer = previews.Previewer(
        model, per_device_batch=args.per_device_batch, max_queue=args.max_queue
    )
    previewer.warm()
    dataset_dir = None if args.dataset is None else os.path.abspath(args.dataset)
    studio = server.Studio(previewer, model_dir, dataset_dir, args.token)
    httpd = server.StudioServer((args.host, args.port), studio)
    previewer.start()
    print(f"sdedit_jax studio: {httpd.url}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        previewer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
