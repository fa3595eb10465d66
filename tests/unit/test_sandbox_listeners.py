from harpoon.sandbox.listeners import changes


def test_what_to_publish_and_unpublish_makes_the_two_sets_equal() -> None:
    published = {("tcp", 80), ("udp", 53)}
    listening = {("tcp", 80), ("tcp", 8080)}
    assert changes(published, listening) == ({("tcp", 8080)}, {("udp", 53)})
    assert changes(listening, listening) == (set(), set())
