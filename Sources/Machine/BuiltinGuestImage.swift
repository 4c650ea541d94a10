// Placeholder until guest/build.sh generates this file.
package enum BuiltinGuestImage {
    package static let bytes: [UInt8] = []
}
