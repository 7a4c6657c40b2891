"""The watcher producer's XCom pushes, sent by one thread (include/dbt_watcher.py: QueuedXComPushes).

The push function here records what reached it after a delay like the api-server's round trip; the
real producer is run by the end-to-end tests.
"""

from __future__ import annotations

import threading
import time

import pytest

from include.dbt_watcher import PUBLISHED_RESULTS_KEY, QueuedXComPushes, sql_page_key


class SlowApi:
    """Records each push in the order it completes, after `delay` seconds, as the api-server would."""

    def __init__(self, delay: float = 0.01, fail_on: str | None = None) -> None:
        self.delay, self.fail_on = delay, fail_on
        self.sent: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def push(self, key: str, value: object, **_: object) -> None:
        time.sleep(self.delay)
        if key == self.fail_on:
            raise ConnectionError(f"api-server unreachable while pushing {key}")
        with self.lock:
            self.sent.append((key, value))

    def keys(self) -> list[str]:
        return [key for key, _ in self.sent]


def test_dbt_threads_never_wait_for_the_api_and_every_result_is_sent_once_closed():
    api = SlowApi(delay=0.05)
    queue = QueuedXComPushes(api.push)
    started = time.perf_counter()
    for n in range(40):
        queue.xcom_push(f"model__p__m{n}_status", {"status": "success", "outlet_uris": [f"uri{n}"]})
    queued_in = time.perf_counter() - started
    queue.close()
    assert queued_in < 0.05, f"queueing 40 pushes took {queued_in:.3f} s: the caller waited for the API"
    results = [(k, v) for k, v in api.sent if k != PUBLISHED_RESULTS_KEY]
    assert results == [(f"model__p__m{n}_status", {"status": "success", "outlet_uris": [f"uri{n}"]}) for n in range(40)]
    assert api.sent[-1] == (PUBLISHED_RESULTS_KEY, {**{f"model__p__m{n}_status": "success" for n in range(40)},
                                                    **{f"model__p__m{n}_outlet_uris": [f"uri{n}"] for n in range(40)}})


def test_a_key_pushed_again_before_it_was_sent_is_sent_once_with_its_latest_value_after_earlier_pushes():
    api = SlowApi(delay=0.05)
    queue = QueuedXComPushes(api.push)
    queue.xcom_push("model__p__a_compiled_sql", "select 1")  # the drainer takes this one at once
    queue.xcom_push("model__p__a_dbt_event", {"status": "error", "msg": "first"})
    queue.xcom_push("model__p__b_compiled_sql", "select 2")
    queue.xcom_push("model__p__a_dbt_event", {"status": "success", "msg": "SELECT 3"})
    queue.close()
    results = [(k, v) for k, v in api.sent if k != PUBLISHED_RESULTS_KEY]
    assert results == [
        ("model__p__a_compiled_sql", "select 1"),
        ("model__p__b_compiled_sql", "select 2"),
        ("model__p__a_dbt_event", {"status": "success", "msg": "SELECT 3"}),
    ]
    assert (queue.sent, queue.replaced) == (3, 1)


def test_a_nodes_running_states_are_not_sent_only_its_terminal_event():
    api = SlowApi()
    queue = QueuedXComPushes(api.push)
    for status in ("started", "compiling", "executing", "success"):
        queue.xcom_push("model__p__a_dbt_event", {"status": status, "msg": None})
    queue.close()
    assert api.sent == [("model__p__a_dbt_event", {"status": "success", "msg": None})]
    assert queue.skipped == 3


def test_any_other_key_is_sent_at_once_after_the_queued_node_results():
    api = SlowApi(delay=0.02)
    queue = QueuedXComPushes(api.push)
    for n in range(5):
        queue.xcom_push(f"test__p__t{n}_status", {"status": "pass", "outlet_uris": []})
    queue.xcom_push("task_status", "completed")  # not a node's key (no "__"): returns once it is sent
    assert api.keys()[-1] == "task_status"
    assert set(api.keys()[:-1]) >= {f"test__p__t{n}_status" for n in range(5)}
    queue.close()


def test_the_published_statuses_only_name_results_already_sent_with_their_status():
    api = SlowApi(delay=0.005)
    queue = QueuedXComPushes(api.push)
    for n in range(30):
        queue.xcom_push(f"model__p__m{n}_dbt_event", {"status": "success", "start_time": "10:00:00",  # fmt: skip
                                                      "finish_time": "10:00:01", "msg": "CREATE VIEW", "node": {}})
        queue.xcom_push(f"model__p__m{n}_status", {"status": "success", "outlet_uris": []})
        queue.xcom_push(f"model__p__m{n}_tests_status", "fail" if n == 7 else "pass")
        time.sleep(0.003)
    queue.close()
    listings = [i for i, (key, _) in enumerate(api.sent) if key == PUBLISHED_RESULTS_KEY]
    assert listings, "no published statuses were sent"
    for i in listings:
        listed = api.sent[i][1]
        sent_before = {k.removesuffix("_outlet_uris") + "_status" for k in listed if k.endswith("_outlet_uris")}
        assert set(listed) - {k for k in listed if k.endswith("_outlet_uris")} | sent_before <= set(api.keys()[:i]), (
            f"listing {i} names a result not sent before it")
        assert all(key.endswith(("_status", "_dbt_event", "_outlet_uris")) for key in listed)
    assert listings[-1] == len(api.sent) - 1
    logged = {"status": "success", "start_time": "10:00:00", "finish_time": "10:00:01", "msg": "CREATE VIEW"}
    assert api.sent[-1][1] == {**{f"model__p__m{n}_status": "success" for n in range(30)},
                               **{f"model__p__m{n}_outlet_uris": [] for n in range(30)},
                               **{f"model__p__m{n}_tests_status": "fail" if n == 7 else "pass" for n in range(30)},
                               **{f"model__p__m{n}_dbt_event": logged for n in range(30)}}


def test_a_failed_push_is_raised_when_closing_and_the_other_results_are_still_sent():
    api = SlowApi(fail_on="model__p__b_status")
    queue = QueuedXComPushes(api.push)
    for name in "abc":
        queue.xcom_push(f"model__p__{name}_status", {"status": "success", "outlet_uris": []})
    with pytest.raises(ConnectionError, match="model__p__b_status"):
        queue.close()
    assert [k for k in api.keys() if k != PUBLISHED_RESULTS_KEY] == ["model__p__a_status", "model__p__c_status"]
    assert api.sent[-1] == (PUBLISHED_RESULTS_KEY, {"model__p__a_status": "success", "model__p__a_outlet_uris": [],
                                                    "model__p__c_status": "success", "model__p__c_outlet_uris": []})


def test_successes_are_only_published_and_failures_are_still_sent_on_their_own():
    api = SlowApi(delay=0.005)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    queue.xcom_push("model__p__a_dbt_event", {"status": "success", "msg": "CREATE VIEW"})
    queue.xcom_push("model__p__a_status", {"status": "success", "outlet_uris": ["uri_a"]})
    queue.xcom_push("model__p__a_compiled_sql", "select 1")
    queue.xcom_push("test__p__t_dbt_event", {"status": "fail", "msg": "Got 2 results, configured to fail if != 0"})
    queue.xcom_push("model__p__a_tests_status", "failed")
    queue.xcom_push("model__p__b_status", {"status": "skipped", "outlet_uris": ["uri_b"]})
    queue.close()
    assert [k for k in api.keys() if k != PUBLISHED_RESULTS_KEY] == [
        "test__p__t_dbt_event", "model__p__a_tests_status", sql_page_key(0)]
    assert api.sent[-2] == (sql_page_key(0), {"model__p__a_compiled_sql": "select 1"})
    assert (queue.sent - api.keys().count(PUBLISHED_RESULTS_KEY), queue.published_only) == (3, 3)
    assert (queue.sql_paged, queue.sql_pages) == (1, 1)
    assert api.sent[-1] == (PUBLISHED_RESULTS_KEY, {
        "model__p__a_dbt_event": {"status": "success", "start_time": None, "finish_time": None, "msg": "CREATE VIEW"},
        "model__p__a_status": "success", "model__p__a_outlet_uris": ["uri_a"], "model__p__a_compiled_sql": 0,
        "test__p__t_dbt_event": {"status": "fail", "start_time": None, "finish_time": None,
                                 "msg": "Got 2 results, configured to fail if != 0"},
        "model__p__a_tests_status": "failed",
        "model__p__b_status": "skipped", "model__p__b_outlet_uris": ["uri_b"]})


def test_a_models_status_is_published_with_the_page_of_its_compiled_sql_sent_before():
    """Its task logs the compiled SQL once the published results say the model succeeded."""
    api = SlowApi(delay=0.03)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    for n in range(4):
        queue.xcom_push(f"model__p__m{n}_status", {"status": "success", "outlet_uris": []})
        time.sleep(0.3)  # Cosmos reads the compiled file in between: here longer than a publishing interval
        queue.xcom_push(f"model__p__m{n}_compiled_sql", f"select {n}")
    queue.close()
    listings = 0
    for i, (key, value) in enumerate(api.sent):
        if key == PUBLISHED_RESULTS_KEY:
            for n in range(4):
                if f"model__p__m{n}_status" in value:
                    listings += 1
                    page = value[f"model__p__m{n}_compiled_sql"]
                    assert dict(api.sent[:i])[sql_page_key(page)][f"model__p__m{n}_compiled_sql"] == f"select {n}"
    assert listings >= 4 and api.sent[-1][0] == PUBLISHED_RESULTS_KEY
    assert not any(key.endswith("_compiled_sql") for key in api.keys()), "compiled SQL sent on its own"


def test_the_compiled_sql_of_models_ending_together_goes_out_in_one_page():
    api = SlowApi(delay=0.005)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    time.sleep(0.05)  # the first, empty, published results are out
    for n in range(50):  # 50 models ending within a publishing interval, as in a wide project's layer
        queue.xcom_push(f"model__p__m{n}_status", {"status": "success", "outlet_uris": []})
        queue.xcom_push(f"model__p__m{n}_compiled_sql", f"select {n}")
    queue.close()
    assert api.keys() == [PUBLISHED_RESULTS_KEY, sql_page_key(0), PUBLISHED_RESULTS_KEY]
    assert api.sent[1][1] == {f"model__p__m{n}_compiled_sql": f"select {n}" for n in range(50)}
    assert {api.sent[2][1][f"model__p__m{n}_compiled_sql"] for n in range(50)} == {0}


def test_published_successes_are_sent_at_most_every_quarter_second_and_at_once_when_closed():
    api = SlowApi(delay=0.002)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    started = time.perf_counter()
    while time.perf_counter() - started < 1.0:  # a success every 5 ms for a second
        queue.xcom_push(f"test__p__t{len(api.sent)}_{time.perf_counter_ns()}_status", {"status": "pass"})
        time.sleep(0.005)
    queue.xcom_push("model__p__last_status", {"status": "success", "outlet_uris": []})
    closing = time.perf_counter()
    queue.close()
    assert time.perf_counter() - closing < 0.1, "close() waited for the next quarter second"
    published = api.keys().count(PUBLISHED_RESULTS_KEY)
    assert 3 <= published <= 6, f"{published} published results in a second of successes every 5 ms"
    assert "model__p__last_status" in api.sent[-1][1]


def test_a_model_without_compiled_sql_is_published_within_a_second_and_the_first_listing_is_empty():
    api = SlowApi(delay=0.005)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    queue.xcom_push("model__p__empty_status", {"status": "success", "outlet_uris": []})  # its file is empty
    started = time.perf_counter()
    while not any(key == PUBLISHED_RESULTS_KEY and "model__p__empty_status" in value for key, value in api.sent):
        assert time.perf_counter() - started < 2, "a model without compiled SQL was never published"
        time.sleep(0.05)
    assert 0.9 < time.perf_counter() - started < 1.5
    queue.close()
    assert api.sent[0] == (PUBLISHED_RESULTS_KEY, {})


def test_a_models_event_and_its_tests_status_are_published_without_waiting_for_its_compiled_sql():
    api = SlowApi(delay=0.005)
    queue = QueuedXComPushes(api.push, successes_published_only=True)
    queue.xcom_push("model__p__a_dbt_event", {"status": "success", "msg": "CREATE VIEW"})
    queue.xcom_push("model__p__a_tests_status", "pass")
    time.sleep(0.5)  # two publishing intervals, well under the second a model's status waits for its SQL
    listed = [value for key, value in api.sent if key == PUBLISHED_RESULTS_KEY][-1]
    assert set(listed) == {"model__p__a_dbt_event", "model__p__a_tests_status"}
    queue.close()
