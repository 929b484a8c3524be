//! The QMP control socket (operator commands); arrives with the control-socket issue.
