#!/bin/bash
# The lines of a KIWI description's config.sh that enable KIWIspray's
# first-boot agent. The package enables the unit by its systemd preset;
# with the root/ overlay (no package) these lines are what enables it.
# KIWI runs config.sh in the image root at the end of the prepare step.

test -f /.kconfig && . /.kconfig
test -f /.profile && . /.profile

# KIWI's helper where the description uses its functions (.kconfig);
# plain systemctl otherwise.
if type baseInsertService >/dev/null 2>&1; then
    baseInsertService kiwispray-firstboot
else
    systemctl enable kiwispray-firstboot.service
fi
