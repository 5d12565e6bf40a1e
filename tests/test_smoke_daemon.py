from daemon_harness import ping_once


def test_daemon_starts_answers_ping_and_stops_cleanly(daemon_factory) -> None:
    d = daemon_factory()
    assert ping_once(d.socket_path)
    assert d.stop() == 0
    assert not d.socket_path.exists()
