"""The Serve application builder: `serve run serve/config.yaml` (or `serve.run(app_builder(ServeArgs(...)))`).

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation to validate the
config's `args:` into `ServeArgs`, which needs the real class, not a string.
"""

from typing import Any

from ray import serve

from diffembed.serving.config import ServeArgs


def app_builder(args: ServeArgs) -> serve.Application:
    """The application of `args`, after the checks a job's driver makes (`loading.check_model`): a model that is
    not there or a damaged checkpoint fails the build with one line, where replicas would each fail to start with a
    traceback, be retried and fail again."""
    from diffembed.models.loading import check_model
    from diffembed.serving.encoder import encoder_deployment
    from diffembed.serving.ingress import ingress_deployment
    from diffembed.serving.retriever import retriever_deployment

    check_model(args.embedder)
    encoder = encoder_deployment(args).bind(
        args.embedder.model_dump(mode="json"),
        args.encoder.max_batch_tokens,
        args.encoder.batch_wait_timeout_s,
        args.encoder.torch_threads or max(1, int(args.encoder.num_cpus)),
    )
    retriever = None
    if args.store is not None:
        retriever = retriever_deployment(args).bind(args.store.model_dump(mode="json"), encoder, args.request_timeout_s)
    # api_key is excluded from repr but must reach the replicas: dump it explicitly
    return ingress_deployment(args).bind(encoder, retriever, args.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> serve.Application:
    """The same builder for callers holding a plain dict (validated into ServeArgs here)."""
    return app_builder(ServeArgs.from_dict(dict(args or {}), source="serve args"))
