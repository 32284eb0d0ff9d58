"""The kubelet's check that a device plugin's resource name is an extended resource name.

Rules (the kubelet's IsExtendedResourceName): the name has a domain prefix (`domain/name`), nothing under
`kubernetes.io/` (reserved for native resources; the kubelet rejects the substring anywhere), no `requests.`
prefix (quota syntax), and `requests.<name>` must be a valid qualified name: a lowercase DNS-1123 subdomain
prefix of at most 253 characters, then a name part of at most 63 characters of alphanumerics, `-`, `_` and
`.` that starts and ends alphanumeric.
"""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_QUOTA_PREFIX = "requests."
_MAX_SUBDOMAIN = 253
_MAX_NAME_PART = 63


def extended_resource_name_problem(name: str) -> str | None:
    """Why the kubelet would reject `name` as a device plugin resource, or None if it accepts it."""
    if "/" not in name:
        return "has no domain prefix; expected 'domain/name' such as 'example.com/cpu'"
    if "kubernetes.io/" in name:
        return "is in the kubernetes.io/ namespace, which is reserved for native resources"
    if name.startswith(_QUOTA_PREFIX):
        return f"starts with {_QUOTA_PREFIX!r}, which is reserved for quota"
    # The kubelet validates the quota form of the name, so the 253-character limit includes "requests.".
    prefix, _, short = (_QUOTA_PREFIX + name).partition("/")
    if "/" in short:
        return "contains more than one '/'"
    if len(prefix) > _MAX_SUBDOMAIN:
        return f"has a domain longer than {_MAX_SUBDOMAIN - len(_QUOTA_PREFIX)} characters"
    if not _DNS1123_SUBDOMAIN.fullmatch(prefix):
        return "has a domain that is not a lowercase DNS subdomain (a-z, 0-9, '-', '.')"
    if not short:
        return "has an empty name after the '/'"
    if len(short) > _MAX_NAME_PART:
        return f"has a name part longer than {_MAX_NAME_PART} characters"
    if not _NAME_PART.fullmatch(short):
        return (
            "has a name part that is not alphanumeric with '-', '_' or '.' inside "
            "(it must start and end with a letter or digit)"
        )
    return None
