"""Builders for the guest artifacts (kernel, agent, initramfs), cached in $SMOLVM_HOME by input hash."""
