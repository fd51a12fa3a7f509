"""Who hears a training run: the model card, the run page, the Hub uploader and webhooks, checked and
built from the configuration before training starts (bad input stops here, exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.train.events import EventFanout

if TYPE_CHECKING:
    from simpletuner.config.load import Settings


def publishing_problems(cfg: Any) -> list[str]:
    """Problems of the Hub options and webhook_config, for `config check` (the token is checked by `train`)."""
    from simpletuner.errors import ConfigError
    from simpletuner.publish.hub import hub_option_problem
    from simpletuner.publish.webhooks import parse_webhook_config

    problems = [problem] if (problem := hub_option_problem(cfg)) else []
    inline = cfg.webhook_config and cfg.webhook_config.lstrip().startswith(("{", "["))
    if inline or (cfg.webhook_config and Path(cfg.webhook_config).expanduser().is_file()):  # else: config check
        try:
            parse_webhook_config(cfg.webhook_config)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def build_events(settings: Settings) -> EventFanout:
    """The run's subscribers, in order: model card, run page, Hub upload (which reads the card), webhooks.
    Raises ConfigError/UserError for a bad Hub option, a missing token or a malformed webhook_config."""
    from simpletuner.publish.hub import HubUploader, check_hub_options
    from simpletuner.publish.report import RunReport
    from simpletuner.publish.run_card import ModelCardWriter
    from simpletuner.publish.webhooks import WebhookNotifier, parse_webhook_config

    cfg = settings.training
    targets = parse_webhook_config(cfg.webhook_config) if cfg.webhook_config else []
    token = check_hub_options(cfg)
    subscribers: list = [ModelCardWriter(), RunReport()]
    if token is not None:
        subscribers.append(HubUploader(cfg.hub_model_id, token, private=cfg.model_card_private,
                                       checkpoints=cfg.push_checkpoints_to_hub))
    if targets:
        subscribers.append(WebhookNotifier(targets, cfg.tracker_run_name or cfg.tracker_project_name,
                                           cfg.webhook_reporting_interval))
    return EventFanout(subscribers)
