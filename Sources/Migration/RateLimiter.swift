/// Limits the migration stream to `max-bandwidth`, in windows of 100 ms as QEMU does
/// (BUFFER_DELAY): each window may carry a tenth of the bandwidth; when it is spent the
/// sender sleeps until the window ends. Each window's bytes and duration also give the
/// measured bandwidth that the downtime test uses.
struct RateLimiter {
    static let windowMilliseconds: UInt64 = 100

    /// Bytes allowed per window; 0 means unlimited.
    var limitPerWindow: UInt64
    private(set) var windowStart: UInt64
    private(set) var bytesAtWindowStart: UInt64

    init(bandwidth: UInt64, now: UInt64, position: UInt64) {
        self.limitPerWindow = Self.limit(for: bandwidth)
        self.windowStart = now
        self.bytesAtWindowStart = position
    }

    /// QEMU's XFER_LIMIT_RATIO: a tenth per window. A result of 0 (bandwidth under 10 B/s)
    /// means unlimited, as in QEMU.
    static func limit(for bandwidth: UInt64) -> UInt64 {
        bandwidth / (1000 / windowMilliseconds)
    }

    /// Whether this window's allowance is spent at stream position `position` (strictly more
    /// than the allowance written, as QEMU counts).
    func isExhausted(position: UInt64) -> Bool {
        limitPerWindow != 0 && position - bytesAtWindowStart > limitPerWindow
    }

    /// Bytes the window still allows (UInt64.max when unlimited).
    func allowance(position: UInt64) -> UInt64 {
        limitPerWindow == 0 ? .max : limitPerWindow - min(limitPerWindow, position - bytesAtWindowStart)
    }

    /// When the window is over, returns its bytes and milliseconds and starts a new one.
    mutating func closeWindowIfElapsed(now: UInt64, position: UInt64) -> (bytes: UInt64, milliseconds: UInt64)? {
        guard now >= windowStart + Self.windowMilliseconds else { return nil }
        let measured = (position - bytesAtWindowStart, now - windowStart)
        windowStart = now
        bytesAtWindowStart = position
        return measured
    }

    /// Milliseconds left in the current window.
    func millisecondsLeft(now: UInt64) -> UInt64 {
        windowStart + Self.windowMilliseconds > now ? windowStart + Self.windowMilliseconds - now : 0
    }
}
