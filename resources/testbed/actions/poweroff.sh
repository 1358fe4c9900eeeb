# Does nothing: the init then powers the guest off (tb.then defaults to poweroff).
true
