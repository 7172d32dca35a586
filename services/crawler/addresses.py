"""Which network addresses the crawler may connect to (SSRF protection).

Search results are URLs chosen by strangers: without a check, a result pointing at 127.0.0.1, a pod
IP, or the cloud metadata endpoint would make the crawler fetch internal resources. Only globally
routable unicast addresses are allowed, unless an address falls inside an explicit allow-list (the
local stack allows 127.0.0.0/8 because its offline web serves images on loopback).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Metadata endpoints of cloud providers. Most are already non-global (link-local, unique-local), but
# naming them keeps the refusal explicit even if a future Python changes what `is_global` means.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; raises ValueError naming the bad entry."""
    networks = []
    for cidr in cidrs:
        text = cidr.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ValueError(f"not a CIDR network: {text!r} ({exc})") from None
    return tuple(networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, 6to4, Teredo), which is where traffic really goes."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Decides whether one resolved address may be connected to."""

    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> "AddressPolicy":
        return cls(parse_networks(cidrs))

    def _allow_listed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow_networks)

    def permits(self, address: IPAddress | str) -> bool:
        if isinstance(address, str):
            # Scoped IPv6 literals ("fe80::1%eth0") are link-local anyway; the scope only hides that.
            address = ipaddress.ip_address(address.split("%", 1)[0])
        if self._allow_listed(address):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            inner = _embedded_ipv4(address)
            if inner is not None:
                return self.permits(inner)
        if address in METADATA_ADDRESSES:
            return False
        # is_global excludes loopback, private, link-local, shared (CGNAT), reserved, unspecified and
        # documentation ranges; multicast is excluded separately because some of it counts as global.
        return address.is_global and not address.is_multicast


def literal_address(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal (brackets allowed), else None."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
