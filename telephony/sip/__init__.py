"""Native SIP/RTP bridge: an asyncio SIP UAS (UDP+TCP) whose calls are telephony.bridge.CallBridge objects.

Entry points: `telephony.sip.server.SipServer` (the UAS) and `telephony.sip.uac.run_sip_call` (a caller
simulator for demos, tests and benchmarks). See docs/sip.md.
"""
