# An interactive shell on the console; the guest powers off when it exits.
setsid cttyhack sh
