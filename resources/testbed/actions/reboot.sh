# Asks the init to reboot the guest once this action returns.
then=reboot
