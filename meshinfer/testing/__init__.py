"""Test helpers shipped in the package: conformance suites, throw-away fleets, servers."""
