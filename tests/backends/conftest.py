"""Fixtures of this folder's tests: the ACNet sample (``net``) and its input (``x``)."""

from deploy_fixtures import net, x  # noqa: F401  (pytest finds fixtures by name in conftest)
