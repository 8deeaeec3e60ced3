"""Developer kit: real, local stand-ins for the things tokensync talks to.

Used by the test suite and by ``tokensync demo``; never by the operator at run time.
Submodules that need heavy optional dependencies (Django, for the identity provider
in :mod:`tokensync.devkit.idp`) import them lazily, so importing this package costs
nothing.
"""
