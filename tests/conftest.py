"""Options shared by every test directory."""


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False, help="rewrite tests/golden/*/stderr.txt and expected.nl from the current output")
