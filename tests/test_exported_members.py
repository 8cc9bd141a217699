import tokenrelay


def test_all_is_exactly_the_public_surface() -> None:
    public = {name for name in dir(tokenrelay) if not name.startswith("_")}
    # Submodules imported as a side effect are not part of the surface unless listed.
    modules = {"config", "request", "usage", "log", "transforms"}
    assert set(tokenrelay.__all__) - {"__version__"} == public - modules
    for name in tokenrelay.__all__:
        assert hasattr(tokenrelay, name)
