"""docs/alerts.yml: well-formed Prometheus rules naming only metrics (and label values) we serve."""

from __future__ import annotations

import re

import pytest
import yaml

from infra import metrics as catalogue
from service_layer.business_figures import DUNNING_STATES, PAYOUT_STATUSES
from tests.support import ROOT

#: The metric names of an expression (Prometheus's own `up` aside).
METRIC = re.compile(r"\b((?:credits|dramatiq)_[a-z_]+)\b(\{[^}]*\})?")
LABEL = re.compile(r'(\w+)\s*=~?\s*"([^"]*)"')
#: Label values an expression may select, for the labels whose values we fix.
VALUES = {
    "outcome": {*catalogue.WORKER_OUTCOMES, *catalogue.LEDGER_OUTCOMES},
    "state": set(DUNNING_STATES),
    "status": set(PAYOUT_STATUSES),
    "actor_name": {"apply_event"},
}


def rules() -> list[dict]:
    document = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def served(name: str) -> bool:
    specs = {m.name: m for m in (*catalogue.WEB_METRICS, *catalogue.WORKER_METRICS)}
    if name in specs:
        return True
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    return base in specs and specs[base].kind == "histogram"


def test_rules_are_well_formed():
    found = rules()
    assert len(found) >= 8
    assert len({rule["alert"] for rule in found}) == len(found), "alert names are unique"
    for rule in found:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_metric_a_rule_names_is_served(rule):
    names = METRIC.findall(rule["expr"])
    assert names or "up{" in rule["expr"], "the rule names a metric"
    for name, selector in names:
        assert served(name), f"{rule['alert']}: {name} is not a metric we serve"
        for label, value in LABEL.findall(selector):
            if label in VALUES:
                assert value in VALUES[label], f"{rule['alert']}: {label}={value!r} never occurs"


def test_the_alerts_cover_the_operators_worries():
    exprs = " ".join(rule["expr"] for rule in rules())
    for name in (
        "credits_dead_letters_total",
        "credits_event_lag_seconds",
        "credits_outbox_oldest_due_seconds",
        "credits_dunning_cases",
        "credits_payouts_total",
        "credits_at_risk_customers",
    ):
        assert name in exprs, name
