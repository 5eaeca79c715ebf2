"""bench: side-by-side benchmarks. Each runs ours and its anchor (dnsmasq, unbound, keepalived,
plain copies) in one run, inside lab namespaces, bounded in count and time, and prints both
figures and their ratio. Speed goals live here, never in timed tests.
"""
