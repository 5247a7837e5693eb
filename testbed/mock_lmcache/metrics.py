"""Prometheus text for the mock controller: the real controller's gauge names plus mock counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.mock_lmcache.app import MockController


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    label_text = ",".join(f'{k}="{v}"' for k, v in (labels or {}).items())
    return f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}"


def render_metrics(ctl: MockController) -> str:
    """Gauges named as lmcache 0.5.6 names them (label role="controller"), then kvgate_mock_* counters."""
    role = {"role": "controller"}
    stats = ctl.registry.key_stats()
    gauges = {
        "lmcache:cache_controller_kv_pool_keys_count": stats["total_key_count"],
        "lmcache:cache_controller_registered_workers_count": len(ctl.registry.all_worker_infos()),
        "lmcache:cache_controller_pull_socket_message_count": ctl.zmq.counters["pull_messages"],
        "lmcache:cache_controller_reply_socket_message_count": ctl.zmq.counters["reply_messages"],
        "lmcache:cache_controller_kv_op_seq_discontinuity_count": ctl.registry.seq_discontinuities,
    }
    lines: list[str] = []
    for name, value in gauges.items():
        lines += [f"# TYPE {name} gauge", _line(name, value, role)]
    lines.append("# TYPE kvgate_mock_lmcache_http_responses_total counter")
    for (path, status), count in sorted(ctl.http_counts.items()):
        lines.append(_line("kvgate_mock_lmcache_http_responses_total", count,
                           {"path": path, "status": str(status)}))  # fmt: skip
    lines.append("# TYPE kvgate_mock_lmcache_faults_injected_total counter")
    for kind, count in ctl.faults.counters.items():
        lines.append(_line("kvgate_mock_lmcache_faults_injected_total", count, {"kind": kind}))
    for key in ("heartbeat_messages", "bad_frames", "dropped_ops"):
        name = f"kvgate_mock_lmcache_{key}_total"
        lines += [f"# TYPE {name} counter", _line(name, ctl.zmq.counters[key])]
    return "\n".join(lines) + "\n"
